"""Adapter references (`law`, `law@v3`, `law@prod`, `law@3f2a9c`) and the names inside them.

Pure functions: parsing and validation never touch the catalog, so errors about the
*shape* of a reference are raised here and errors about *existence* in the registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from studio.errors import RegistryError

DOMAIN_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
VERSION_RE = re.compile(r"^v([0-9]{1,9})$")
SHA_PREFIX_RE = re.compile(r"^(?:sha256:)?([0-9a-f]{6,64})$")
REMOTE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
RESERVED_ALIASES = {"latest"}
MIN_SHA_PREFIX = 6

REF_HELP = "use DOMAIN, DOMAIN@vN, DOMAIN@ALIAS or DOMAIN@SHA-PREFIX (e.g. law, law@v3, law@prod)"


@dataclass(frozen=True)
class Ref:
    """A parsed reference. Exactly one of number / alias / sha_prefix is set, or none (latest)."""

    domain: str
    number: int | None = None
    alias: str | None = None
    sha_prefix: str | None = None
    text: str = ""

    @property
    def is_latest(self) -> bool:
        return self.number is None and self.alias is None and self.sha_prefix is None


def check_domain(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise RegistryError(f"empty domain name: {REF_HELP}")
    if not DOMAIN_RE.match(name):
        hint = name.lower().replace(" ", "-")
        hint = re.sub(r"[^a-z0-9_-]", "", hint)
        fix = f" (e.g. '{hint}')" if hint and DOMAIN_RE.match(hint) else ""
        raise RegistryError(
            f"invalid domain name {name!r}: a domain is 1-64 lowercase letters, digits, '-' or '_', "
            f"starting with a letter or digit, with no '/', '.' or spaces{fix}"
        )
    return name


def check_alias(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise RegistryError("empty alias name: aliases are names such as prod or staging")
    if name in RESERVED_ALIASES:
        raise RegistryError(f"alias {name!r} is reserved (DOMAIN@latest always means the newest version); "
                            "pick another name")
    if re.match(r"^v[-+]?[0-9]", name):  # v3, v9999999999, v-1: all read as version syntax, never as names
        raise RegistryError(f"alias {name!r} looks like a version number (vN); pick a name such as prod or staging")
    if not ALIAS_RE.match(name):
        raise RegistryError(
            f"invalid alias {name!r}: an alias is 1-64 lowercase letters, digits, '-' or '_', starting with a letter"
        )
    if SHA_PREFIX_RE.match(name):
        raise RegistryError(f"alias {name!r} looks like a sha prefix (only hex digits); pick a name with other letters")
    return name


def check_remote_name(name: str) -> str:
    if not isinstance(name, str) or not REMOTE_RE.match(name):
        raise RegistryError(
            f"invalid remote name {name!r}: use 1-64 letters, digits, '.', '-' or '_', "
            "starting with a letter (e.g. origin)"
        )
    return name


def parse_ref(text: str) -> Ref:
    """Parse `law`, `law@v3`, `law@latest`, `law@prod` or `law@<sha prefix>`; raise RegistryError on bad shape."""
    if not isinstance(text, str):
        raise RegistryError(f"adapter reference must be a string, got {type(text).__name__}: {REF_HELP}")
    raw = text.strip()
    if not raw:
        raise RegistryError(f"empty adapter reference: {REF_HELP}")
    if raw.count("@") > 1:
        raise RegistryError(f"invalid adapter reference {text!r}: more than one '@'; {REF_HELP}")
    domain, _, selector = raw.partition("@")
    if not domain or not DOMAIN_RE.match(domain):
        try:
            check_domain(domain)
        except RegistryError as exc:
            raise RegistryError(f"invalid adapter reference {text!r}: {exc}; {REF_HELP}") from None
    if "@" in raw and not selector:
        raise RegistryError(f"invalid adapter reference {text!r}: nothing after '@'; {REF_HELP}")
    if not selector or selector == "latest":
        return Ref(domain, text=raw)
    m = VERSION_RE.match(selector)
    if not m and re.match(r"^v[-+]?[0-9]", selector):
        raise RegistryError(f"invalid adapter reference {text!r}: {selector!r} is not a version number; versions are "
                            "v1, v2, ... (at most 9 digits)")
    if m:
        number = int(m.group(1))
        if number < 1:
            raise RegistryError(f"invalid adapter reference {text!r}: versions start at v1")
        return Ref(domain, number=number, text=raw)
    m = SHA_PREFIX_RE.match(selector)
    if m:
        return Ref(domain, sha_prefix=m.group(1), text=raw)
    if ALIAS_RE.match(selector):
        return Ref(domain, alias=selector, text=raw)
    raise RegistryError(
        f"invalid adapter reference {text!r}: {selector!r} is neither a version (v3), an alias (prod) "
        f"nor a sha prefix of at least {MIN_SHA_PREFIX} hex digits; {REF_HELP}"
    )


def format_ref(domain: str, number: int) -> str:
    return f"{domain}@v{number}"


def format_numbers(numbers) -> str:
    """[1, 2, 3, 5, 7, 8] -> 'v1-v3, v5, v7-v8' so error messages stay short."""
    nums = sorted(set(numbers))
    if not nums:
        return "none"
    parts, start, prev = [], nums[0], nums[0]
    for n in nums[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(f"v{start}" if start == prev else f"v{start}-v{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)
