"""Secrets out of everything taskd prints: broker URLs and settings.

Design notes:

* A broker URL is not parsed with ``urllib``: a password with an unencoded
  ``/``, ``#``, ``?`` or ``@`` makes the parse put part of it in the host or
  the path, and the password shows. Instead, the userinfo ends at the last
  ``@`` that is followed by something shaped like a host (``name[:port]``,
  then ``/``, ``?``, ``#`` or the end). Everything after the user name's
  ``:`` up to there is masked. When in doubt this masks too much, never too
  little.
* Query values (pika's ``?ssl_options={'password': ..., 'keyfile': ...}``)
  are masked when their key, or a key inside a dict-like value, names a
  secret (:func:`is_secret`).
* :func:`mask_value` is the helper for a single setting (for example a TLS
  key password in ``broker.tls``): any key that :func:`is_secret` names is
  printed as ``***``, and a ``url`` as :func:`mask_url` prints it.
* :func:`scrub` removes a URL's secrets from other text, such as the message
  of an exception pika raised about that URL ("Port could not be cast to
  integer value as 'pa'" quotes part of a password with an unencoded ``/``).
"""
from __future__ import annotations

import re
import urllib.parse

MASK = "***"

_SECRET_NAME = re.compile(r"pass|secret|token|key|credential", re.I)
_HOST_THEN_END = re.compile(r"^[\w.\-\[\]:%]*(?:[/?#]|$)")
# 'password': 'x', "keyfile": "x", key_password=x ... inside a query value
_SECRET_ITEM = re.compile(
    r"""(?P<key>['"]?[\w-]*(?:pass|secret|token|key|credential)[\w-]*['"]?\s*[:=]\s*)"""
    r"""(?P<value>'[^']*'|"[^"]*"|[^,}&\s]*)""", re.I)


def is_secret(name):
    """Whether a setting or option called ``name`` holds a secret (password, key ...)."""
    return bool(_SECRET_NAME.search(str(name)))


def mask_value(name, value):
    """``value`` as it may be printed for the setting ``name``."""
    if value is None:
        return value
    if is_secret(name):
        return MASK
    if str(name).endswith("backend") and isinstance(value, str):
        return mask_url(value)
    if str(name).endswith("url") and isinstance(value, str):
        from .broker.nodes import split_urls      # lazily: taskd.broker imports masking
        return ";".join(mask_url(u) for u in split_urls(value)) or mask_url(value)
    if str(name).endswith("url") and isinstance(value, (list, tuple)):
        return [mask_url(u) if isinstance(u, str) else u for u in value]
    return value


def _userinfo_end(rest):
    """Index of the ``@`` ending the userinfo in ``rest`` (the URL after ``://``), or -1.

    An ``@`` before the first ``?`` is preferred (a query value may hold one);
    else any, for a password with an unencoded ``?``."""
    for limit in (rest.find("?"), len(rest)):
        at = rest.rfind("@", 0, limit if limit >= 0 else len(rest))
        while at >= 0:
            if _HOST_THEN_END.match(rest[at + 1:]):
                return at
            at = rest.rfind("@", 0, at)
    return -1


def _mask_query(query):
    out = []
    for pair in query.split("&"):
        key, sep, value = pair.partition("=")
        if not sep:
            out.append(pair)
        elif is_secret(urllib.parse.unquote_plus(key)):
            out.append(f"{key}={MASK}")
        else:
            text = urllib.parse.unquote_plus(value)
            if _SECRET_NAME.search(text):
                out.append(f"{key}={_SECRET_ITEM.sub(lambda m: m['key'] + repr(MASK), text)}")
            else:
                out.append(pair)
    return "&".join(out)


def mask_url(url):
    """The URL with its password and secret query values replaced by ``***``."""
    scheme, sep, rest = str(url).partition("://")
    if not sep:
        scheme, rest = "", scheme
    userinfo = ""
    end = _userinfo_end(rest)
    if end >= 0:
        user, colon, _password = rest[:end].partition(":")
        userinfo = user + (":" + MASK if colon else "") + "@"
        rest = rest[end + 1:]
    location, qmark, query = rest.partition("?")
    if qmark:
        rest = location + "?" + _mask_query(query)
    return f"{scheme}{sep}{userinfo}{rest}"


def _secrets(url):
    """The secret strings in ``url``: the password (whole, decoded and split at the
    characters that end a URL part) and the secret query values."""
    rest = str(url).partition("://")[2] or str(url)
    found = []
    end = _userinfo_end(rest)
    if end >= 0:
        password = rest[:end].partition(":")[2]
        found += [password, urllib.parse.unquote(password), *re.split(r"[/#?@:]", password)]
        rest = rest[end + 1:]
    for pair in rest.partition("?")[2].split("&"):
        key, _sep, value = pair.partition("=")
        text = urllib.parse.unquote_plus(value)
        if is_secret(urllib.parse.unquote_plus(key)):
            found.append(text)
        found += [m["value"].strip("'\"") for m in _SECRET_ITEM.finditer(text)]
    return sorted({f for f in found if len(f) >= 2}, key=len, reverse=True)


def scrub(text, url):
    """``text`` with every secret of ``url`` (see :func:`_secrets`) replaced by ``***``."""
    text = str(text)
    for secret in _secrets(url):
        text = re.sub(rf"(?<!\w){re.escape(secret)}(?!\w)", MASK, text)
    return text
