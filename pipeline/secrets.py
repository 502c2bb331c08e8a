"""Credentials by reference, and keeping secret values out of everything a run writes.

Rules (README "Credentials"):

* Any string in ``input.storage_options`` or ``output.storage_options`` (nested too) may be
  a reference: ``${env:NAME}`` (an environment variable) or ``${secret:NAME}`` (a Prefect
  Secret block; the ``flows`` package registers that resolver, the library never imports
  Prefect). References are resolved where data is opened
  (:func:`pipeline.io.stores.effective_options`), in the process that opens it.
* A *literal credential* is a non-reference value under a credential-like key
  (:data:`CREDENTIAL_KEY`) or a string shaped like one (URL user-info, ``AccountKey=``,
  ``SharedAccessSignature=``/``sig=``, ``Bearer``/``Basic`` header values, AWS key ids).
  What leaves the CLI for Prefect holds none: :func:`move_to_environment` moves each into
  an environment variable of this process (``ZF_CREDENTIAL_<n>``) and leaves a reference;
  :func:`refuse_literals` refuses them for ``submit``. Credentials in ``input.url`` /
  ``output.url`` are refused by every command (:func:`refuse_url_credentials`).
* Every secret value seen (literal in options that are opened, or resolved from a
  reference) is remembered; :func:`scrub` masks those values and the shapes above in free
  text, :func:`redact` masks structured values by key and shape, and the log record
  factory installed by :func:`install_log_scrubber` scrubs every log record and drops the
  traceback of records about a :class:`~pipeline.errors.UserError`.

This module imports only the standard library (it is imported by ``pipeline.config``).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, unquote

from pipeline.errors import ConfigError, UserError

MASK = "***"

# Keys whose values are credentials (matched anywhere in the key, any case). "key" covers
# key, access_key, account_key, AccountKey; "auth" covers Authorization, auth, oauth.
CREDENTIAL_KEY = re.compile(
    r"key|secret|token|passw|pwd|passphrase|credential|session|connection_?string|sas|auth"
    r"|cookie",
    re.I,
)
REFERENCE = re.compile(r"^\$\{(?P<scheme>[a-z]+):(?P<name>[^{}\s]+)\}$")
INTERNAL_PREFIX = "ZF_CREDENTIAL_"  # variables this process creates for moved literals
# Shorter values are not scrubbed from free text: "pass" would mask "first pass".
MIN_SECRET_LENGTH = 6

# Free-text shapes of credentials: (pattern, replacement).
_SHAPES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?<=://)[^/@\s'\"]+@"), MASK + "@"),  # URL user-info
    # user:password@host without a scheme (botocore quotes a bucket name like that)
    (re.compile(r"(?<![\w/])[\w.%+-]+:[^\s/@'\":]+@(?=[\w.-])"), MASK + "@"),
    # In connection strings the signature is itself a query (sv=…&sig=…): up to ";".
    (re.compile(r"(?i)\bSharedAccessSignature=[^;\s'\"]+"), "SharedAccessSignature=" + MASK),
    (
        re.compile(
            r"(?i)\b(AccountKey|SharedAccessKey|sig|Password|Pwd|"
            r"X-Amz-Security-Token|X-Amz-Credential)=([^;&\s'\"]+)"
        ),
        r"\1=" + MASK,
    ),
    (re.compile(r"\bCredential=[^/\s,'\"]+"), "Credential=" + MASK),  # SigV4 headers
    # Header values: a token holds a digit, +/= or an inner capital ("Basic usage" stays).
    (
        re.compile(r"\b(Bearer|Basic)\s+(?=[\w.~+/-]*[0-9+/=]|[\w.~+/-]+[A-Z])[\w.~+/-]{8,}=*"),
        r"\1 " + MASK,
    ),
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), MASK),  # AWS access key ids
]
# A password in a URL: scheme://user:password@ (github://org:repo@ref is not one).
_URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][\w+.-]*)://[^/@\s:]*:(?P<pw>[^/@\s]+)@")
_NOT_CREDENTIAL_SCHEMES = {"github"}

_lock = threading.Lock()
_known: set[str] = set()
_known_sorted: tuple[str, ...] = ()
_resolvers: dict[str, Callable[[str], Any]] = {}
_moved: dict[str, str] = {}  # literal value → the variable that holds it now


# --------------------------------------------------------------------------- predicates


def is_reference(value: Any) -> bool:
    """True for ``${scheme:NAME}`` strings."""
    return isinstance(value, str) and REFERENCE.match(value) is not None


def is_credential_key(key: Any) -> bool:
    """True for keys whose values are credentials (see :data:`CREDENTIAL_KEY`)."""
    return CREDENTIAL_KEY.search(str(key)) is not None


def _has_shape(text: str) -> bool:
    return any(pattern.search(text) for pattern, _ in _SHAPES)


def url_password(url: str) -> str | None:
    """The password in a URL's user-info (``scheme://user:pass@``), or ``None``."""
    for m in _URL_PASSWORD.finditer(url):
        if m["scheme"].lower() not in _NOT_CREDENTIAL_SCHEMES:
            return m["pw"]
    return None


# --------------------------------------------------------------------------- known secrets


def register_secret(value: Any) -> None:
    """Remember a secret value so :func:`scrub` masks it (short values are ignored)."""
    global _known_sorted
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return
    text = str(value)
    forms = {text, quote(text, safe=""), unquote(text)}
    new = {f for f in forms if len(f) >= MIN_SECRET_LENGTH and not is_reference(f)} - _known
    if new:
        with _lock:
            _known.update(new)
            _known_sorted = tuple(sorted(_known, key=len, reverse=True))


def _register_shapes(text: str) -> None:
    """Remember the secret parts of a string shaped like a credential."""
    pw = url_password(text)
    if pw:
        register_secret(pw)
    for m in re.finditer(r"(?i)\b(?:AccountKey|SharedAccessKey|sig|Password|Pwd)=([^;&\s]+)", text):
        register_secret(m.group(1))


def register_options(options: Any, secret: bool = False) -> None:
    """Remember every credential in (resolved) storage options."""
    if isinstance(options, dict):
        for k, v in options.items():
            register_options(v, secret or is_credential_key(k))
    elif isinstance(options, list | tuple):
        for v in options:
            register_options(v, secret)
    elif isinstance(options, str) and not is_reference(options):
        if secret:
            register_secret(options)
        _register_shapes(options)
    elif secret:
        register_secret(options)


# --------------------------------------------------------------------------- masking


def scrub(text: str) -> str:
    """``text`` with every known secret value and every credential shape masked."""
    if not text:
        return text
    for value in _known_sorted:
        if value in text:
            text = text.replace(value, MASK)
    for pattern, replacement in _SHAPES:
        text = pattern.sub(replacement, text)
    return text


def redact(value: Any, _secret: bool = False) -> Any:
    """Copy of ``value`` with credentials masked, for logs, reports and provenance.

    Values under credential-like keys become ``***`` (nested lists/mappings leaf by leaf;
    ``None``, ``""`` and booleans stay); strings anywhere are scrubbed by shape
    (URL user-info, ``AccountKey=`` …). References (``${env:NAME}``) stay visible, except
    the variables the CLI made for moved literals, which read ``***`` like the literal.
    """
    if isinstance(value, dict):
        return {k: redact(v, _secret or is_credential_key(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, _secret) for v in value]
    if isinstance(value, str):
        m = REFERENCE.match(value)
        if m:
            return MASK if m["name"].startswith(INTERNAL_PREFIX) else value
        return MASK if _secret and value else scrub(value)
    if _secret and value is not None and not isinstance(value, bool):
        return MASK
    return value


# --------------------------------------------------------------------------- references


def register_resolver(scheme: str, resolver: Callable[[str], Any]) -> None:
    """Resolve ``${scheme:NAME}`` with ``resolver(NAME)`` (``flows`` registers ``secret``)."""
    _resolvers[scheme] = resolver


def _from_env(name: str) -> str:
    try:
        return os.environ[name]
    except KeyError:
        raise ConfigError(f"environment variable {name} is not set") from None


register_resolver("env", _from_env)


def _resolve_one(value: str, where: str) -> Any:
    m = REFERENCE.match(value)
    assert m is not None
    scheme, name = m["scheme"], m["name"]
    resolver = _resolvers.get(scheme)
    if resolver is None:
        hint = (
            "Prefect Secret blocks resolve only where the flows package is loaded "
            "(the factorize command, Prefect flow runs)"
            if scheme == "secret"
            else "use ${env:NAME} or ${secret:NAME}"
        )
        raise ConfigError(f"{where}: cannot resolve {value}: {hint}")
    try:
        resolved = resolver(name)
    except Exception as exc:  # any resolver failure is the user's to fix
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where}: {scrub(detail)}") from None
    register_secret(resolved)
    return resolved


def resolve(value: Any, where: str = "storage_options") -> Any:
    """Copy of ``value`` with every ``${env:…}``/``${secret:…}`` string resolved.

    Resolved values are remembered as secrets (see :func:`scrub`).

    Raises
    ------
    ConfigError
        One line naming the key path, e.g. ``input.storage_options.secret: environment
        variable ZF_S3_SECRET is not set``.
    """
    if isinstance(value, dict):
        return {k: resolve(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(resolve(v, f"{where}[{i}]") for i, v in enumerate(value))
    if is_reference(value):
        return _resolve_one(value, where)
    return value


def _specs(config: Any) -> list[tuple[str, Any]]:
    return [("input", config.input), ("output", config.output)]


def has_references(config: Any, scheme: str) -> bool:
    """True when the job's storage options hold a ``${scheme:…}`` reference."""
    found: list[bool] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)
        elif isinstance(v, str) and (m := REFERENCE.match(v)) and m["scheme"] == scheme:
            found.append(True)

    for _, spec in _specs(config):
        walk(spec.storage_options)
    return bool(found)


def check_references(config: Any, source: str | None = None) -> None:
    """Resolve every reference of a job once, so a missing one fails early and by name.

    Raises
    ------
    ConfigError
    """
    prefix = f"{source}: " if source else ""
    for name, spec in _specs(config):
        try:
            register_options(resolve(spec.storage_options, f"{name}.storage_options"))
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from None


# --------------------------------------------------------------------------- literals


def literal_credentials(options: Any, where: str, secret: bool = False) -> list[str]:
    """Key paths of the literal credentials in ``options`` (references are not literal)."""
    if isinstance(options, dict):
        return [
            p
            for k, v in options.items()
            for p in literal_credentials(v, f"{where}.{k}", secret or is_credential_key(k))
        ]
    if isinstance(options, list | tuple):
        return [
            p
            for i, v in enumerate(options)
            for p in literal_credentials(v, f"{where}[{i}]", secret)
        ]
    if isinstance(options, str):
        if is_reference(options) or not options:
            return []
        return [where] if secret or _has_shape(options) else []
    if secret and options is not None and not isinstance(options, bool):
        return [where]
    return []


def refuse_url_credentials(config: Any, source: str) -> None:
    """Credentials in ``input.url``/``output.url`` are refused by every command.

    Raises
    ------
    ConfigError
    """
    for name, spec in _specs(config):
        if url_password(spec.url) is not None:
            raise ConfigError(
                f"{source}: {name}.url: a password in the URL would be logged and stored; "
                f"remove user:password@ and give the credentials in {name}.storage_options, "
                "e.g. secret: ${env:NAME} or ${secret:NAME}"
            )


def refuse_literals(config: Any, source: str) -> None:
    """Jobs sent to a Prefect server must hold references only (``submit``).

    Raises
    ------
    ConfigError
        One line naming the first literal's key path, with the hint.
    """
    refuse_url_credentials(config, source)
    for name, spec in _specs(config):
        paths = literal_credentials(spec.storage_options, f"{name}.storage_options")
        if paths:
            more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
            raise ConfigError(
                f"{source}: {paths[0]}{more}: a literal credential would be stored in the "
                "Prefect server's database; write ${env:NAME} (a variable set where the flow "
                "runs) or ${secret:NAME} (a Prefect Secret block) instead"
            )


def _move(options: Any, secret: bool = False) -> Any:
    if isinstance(options, dict):
        return {k: _move(v, secret or is_credential_key(k)) for k, v in options.items()}
    if isinstance(options, list | tuple):
        return [_move(v, secret) for v in options]
    if not literal_credentials(options, "", secret):
        return options
    value = str(options)
    register_secret(value)
    if isinstance(options, str):
        _register_shapes(options)
    with _lock:
        var = _moved.get(value)
        if var is None:
            var = f"{INTERNAL_PREFIX}{len(_moved) + 1}"
            _moved[value] = var
    os.environ[var] = value
    return "${env:" + var + "}"


def move_to_environment(config: Any) -> Any:
    """The job with each literal credential moved into a variable of this process.

    The variable (``ZF_CREDENTIAL_<n>``) is set in ``os.environ``, so flows run by this
    process and its subprocesses (``serve``'s flow runs, local Dask workers) resolve it;
    the returned config holds ``${env:ZF_CREDENTIAL_<n>}`` in its place.
    """
    update = {}
    for name, spec in _specs(config):
        moved = _move(spec.storage_options)
        if moved != spec.storage_options:
            update[name] = spec.model_copy(update={"storage_options": moved})
    return config.model_copy(update=update) if update else config


# --------------------------------------------------------------------------- logs, errors


def _is_shutdown_chatter(record: logging.LogRecord) -> bool:
    """distributed's INFO records with a traceback (e.g. "Batched Comm Closed" while a
    cluster closes after a failed run): not an error, and no traceback for the user."""
    root = record.name.split(".", 1)[0]
    return root in ("distributed", "tornado") and record.levelno < logging.WARNING


def _scrub_record(record: logging.LogRecord) -> None:
    exc = record.exc_info[1] if isinstance(record.exc_info, tuple) else None
    if isinstance(exc, UserError) or (exc is not None and _is_shutdown_chatter(record)):
        # The one-line message is the whole story; the traceback would break the contract.
        record.exc_info, record.exc_text = None, None
        record.user_error = isinstance(exc, UserError)  # the CLI's console filter reads it
    elif exc is not None:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        clean = scrub(text)
        if clean != text:
            record.exc_info, record.exc_text = None, clean
    try:
        message = record.getMessage()
    except Exception:  # a bad format string is the logging module's to report
        return
    clean = scrub(message)
    if clean != message:
        record.msg, record.args = clean, ()


def install_log_scrubber() -> None:
    """Scrub every log record of this process as it is made (idempotent).

    A :class:`logging.LogRecord` factory: the final message and the exception text are
    scrubbed (:func:`scrub`), and records about a :class:`~pipeline.errors.UserError`
    lose their traceback (Prefect logs task and flow failures with ``exc_info``).
    """
    current = logging.getLogRecordFactory()
    if getattr(current, "_zf_scrubber", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = current(*args, **kwargs)
        _scrub_record(record)
        return record

    factory._zf_scrubber = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def scrubbed_exception(exc: BaseException) -> BaseException:
    """``exc``, or one of the same type whose message is scrubbed when it held a secret.

    Types that cannot be built from one message become ``RuntimeError("<Type>: …")``.
    """
    text = str(exc)
    clean = scrub(text)
    if clean == text:
        return exc
    try:
        new = type(exc)(clean)
        if str(new) != clean:
            raise TypeError
    except Exception:  # constructors with other signatures
        new = RuntimeError(f"{type(exc).__name__}: {clean}")
    return new.with_traceback(exc.__traceback__)


@contextmanager
def scrubbed_errors() -> Iterator[None]:
    """Re-raise exceptions with scrubbed messages (Prefect stores them in its database)."""
    try:
        yield
    except Exception as exc:
        clean = scrubbed_exception(exc)
        if clean is exc:
            raise
        raise clean from None
