"""The ledger's row MAC, made by the native encoder (``_C_cpu.ledger_rows``, used by
``Ledger.write``) and by the Python reference (``nnmark.ledger._row_values``, used for rows
the native one does not handle, and ``row_mac``): the same bytes and MACs as the ledgers
written before the native encoder, under every CPU SIMD path."""
from __future__ import annotations

import copy
import hashlib
import hmac
import math
import os
from collections import UserDict

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nnmark import _C_cpu, ledger  # noqa: E402
from nnmark.ledger import FIELDS, Ledger, row_mac, row_verifies  # noqa: E402

KEY = bytes(range(32))
LONG_KEY = bytes(range(100))  # longer than a block: hashed first (RFC 2104)
BASE = {"path": "/data/ckpt00000.safetensors", "key_id": "e1ae9279089395f1", "size": 157928,
        "mtime_ns": 1796478108335766169, "inode": 2146313, "ctime_ns": 1796478108335766170,
        "format": "safetensors", "carrier": "layer1.0.conv2.weight",
        "carrier_sha256": "d3fe9be8afe39c544ed1ccd5d6526c60fd40b07e7b0460bb7a9ea2cbe70a6747",
        "bytes_read": 155648, "status": "ok", "verified": True, "matches": 256, "bits": 256, "ber": 0.0,
        "p_value": 8.636168555094445e-78, "threshold": 167, "alpha": 1e-06, "null": "binomial(p0=0.5)",
        "read_s": 0.0017610989998502191, "verify_s": 3.686849123097776e-05, "scanned_at": 1796482979.4403222}
# Escapes, a name that is not UTF-8, non-finite and odd floats, the smallest int64.
ODD = dict(BASE, path="/data/caf\udcff \u00e9 \"q\"\\\n\t\x01\x7f \U0001F600.pt", status="corrupt", verified=False,
           matches=None, ber=None, p_value=float("nan"), read_s=float("inf"), verify_s=-0.0, scanned_at=5e-324,
           error_class="TruncatedFile", error_message="caf\u00e9: \u2028 ends early", controls=0,
           commitment_id="00ff00ff00ff00ff", commitment_matches=False, inode=-2 ** 63, integrity="changed",
           warning="", mac="stale")
# Made by the code before the native encoder (commit 3550f15): ledgers it wrote must verify.
BASE_CANONICAL = (
    b'[256,155648,"layer1.0.conv2.weight","d3fe9be8afe39c544ed1ccd5d6526c60fd40b07e7b0460bb7a9ea2cbe70a6747",'
    b'null,null,null,null,1796478108335766170,null,null,null,"safetensors",2146313,null,"e1ae9279089395f1",256,'
    b'1796478108335766169,"binomial(p0=0.5)","/data/ckpt00000.safetensors",157928,"ok",167,1,null]'
    b'8dedb5a0f7c6b03e0000000000000000000000000000f87f000000000000f02f000000a795da5c3f3d2edce809c5da419dc574'
    b'b66754033f')
KNOWN = {("BASE", "KEY"): "39606138862cbc38672df3a5598a35e5e5827744e8bcb9290bd0fefa19033520",
         ("BASE", "LONG_KEY"): "17d2bce34348d6b8ab34e435935174e2437ac20e1d67d4a680a53014f23cae5b",
         # ODD's verify_s is -0.0, signed as the 0.0 SQLite gives back (3550f15 signed -0.0 itself,
         # so such a row never verified once read back); these are 3550f15's MACs with 0.0.
         ("ODD", "KEY"): "d1e91fc2411ce25591e15e3e0efedfbfaff129d718fdc5b5258a1f6a7329af30",
         ("ODD", "LONG_KEY"): "6ad991f7e9ac3f7f814bb49bfb53d380b525325eaf00a3aaf026014f7bc213b4"}


def _native(rows: list, macs) -> list[list]:
    assert ledger._native_rows is not None, "the native module predates ledger_rows: rebuild it"
    return ledger._batch_values(rows, macs)


def _python(rows: list, macs) -> list[list]:
    signers = ledger._signers(macs) if macs else {}
    return [ledger._row_values(r, signers) for r in rows]


def test_sha256_and_hmac_match_hashlib(isa):
    assert _C_cpu.sha256_native() is False or isa != "generic"
    for n in [*range(0, 130), 183, 191, 192, 1000, 4097]:  # every padding case around block ends
        msg = os.urandom(n)
        assert _C_cpu.sha256(msg) == hashlib.sha256(msg).digest(), n
        for key in (b"", b"k", KEY, bytes(64), LONG_KEY):
            assert _C_cpu.hmac_sha256(key, msg) == hmac.digest(key, msg, "sha256"), (n, len(key))


def test_known_rows_keep_their_bytes_and_macs(isa):
    assert ledger._canonical(ledger._normalize(list(map(BASE.get, FIELDS)))) == BASE_CANONICAL
    rows, keys = {"BASE": BASE, "ODD": ODD}, {"KEY": KEY, "LONG_KEY": LONG_KEY}
    for (rn, kn), want in KNOWN.items():
        assert row_mac(rows[rn], keys[kn]) == want
        r = dict(rows[rn])
        v = _native([r], {r["key_id"]: keys[kn]})[0]
        assert v[ledger._MAC] == r["mac"] == want, (rn, kn)
        assert row_verifies(r, keys[kn])


def test_a_ledger_written_natively_verifies_and_reads_back(tmp_path):
    rows = [dict(BASE, path=f"/data/{i}.safetensors", inode=i) for i in range(300)] + [dict(ODD)]
    rows.append(dict(BASE, key_id="another key", mac="kept as it is"))
    with Ledger(tmp_path / "l.sqlite") as led:
        assert led.write(rows, {BASE["key_id"]: KEY}) == len(rows)
        trusted = led.identities(macs={BASE["key_id"]: KEY, "another key": KEY})
        assert len(trusted) == 301 and ODD["path"] in trusted
        back = {r["path"]: r for r in led.rows()}
    assert back[rows[0]["path"]]["mac"] == rows[0]["mac"] and len(rows[0]["mac"]) == 64
    assert back[ODD["path"]]["p_value"] is None and back[ODD["path"]]["read_s"] is None
    assert back[ODD["path"]]["verify_s"] == 0.0  # -0.0 as SQLite returns it, and the row verifies
    assert rows[-1]["mac"] == "kept as it is" == [r for r in back.values() if r["key_id"] == "another key"][0]["mac"]


# Values of each column kind as a scan makes them, and the odd ones only the Python path
# takes (numpy scalars, bools, int and str subclasses, floats in INTEGER columns, huge ints).
class _Str(str):
    pass


_PLAIN = {"i": st.one_of(st.none(), st.integers(-2 ** 63, 2 ** 63 - 1), st.booleans()),
          "r": st.one_of(st.none(), st.floats()),
          "t": st.one_of(st.none(), st.text(max_size=12),
                         st.text(alphabet=st.characters(min_codepoint=0xdc80, max_codepoint=0xdcff), max_size=3))}
_ODD = {"i": st.one_of(st.integers(2 ** 63, 2 ** 70), st.builds(np.int64, st.integers(-2 ** 40, 2 ** 40)),
                       st.sampled_from([2.0, 2.5, -0.0, math.nan])),
        "r": st.one_of(st.integers(-10, 10), st.builds(np.float64, st.floats(width=32)), st.booleans()),
        "t": st.one_of(st.builds(_Str, st.text(max_size=4)), st.integers(-5, 5))}


@st.composite
def _row(draw):
    odd = draw(st.integers(0, 3)) == 0  # a quarter of the rows with some odd values
    r = {}
    for i, name in enumerate(FIELDS):
        if draw(st.booleans()) and name not in ("key_id", "path"):
            continue  # missing
        kind = ledger._KINDS[i]
        r[name] = draw(_ODD[kind] if odd and draw(st.integers(0, 4)) == 0 else _PLAIN[kind])
    if draw(st.integers(0, 3)):
        r["key_id"] = draw(st.sampled_from(["a", "b", "\u00e9"]))
    return UserDict(r) if draw(st.integers(0, 9)) == 0 else r


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.lists(_row(), max_size=6))
def test_the_native_encoder_gives_the_python_paths_values_and_macs(rows):
    macs = {"a": KEY, "\u00e9": LONG_KEY}  # "b" and others: not signed, their mac kept
    a, b = copy.deepcopy(rows), copy.deepcopy(rows)
    try:
        want = _python(b, macs)
    except (ValueError, TypeError, OverflowError) as exc:  # a value no column takes
        with pytest.raises(type(exc)):
            _native(a, macs)
        return
    got = _native(a, macs)
    assert got == want and [list(map(type, v)) for v in got] == [list(map(type, v)) for v in want]
    # (repr: a NaN equals itself there; signed rows got their mac set in both)
    assert [repr(dict(r)) for r in a] == [repr(dict(r)) for r in b]


def test_plain_rows_never_take_the_python_path():
    def slow(r):
        raise AssertionError(f"the Python path got {r}")

    rows = [dict(BASE), dict(ODD), dict(BASE, verified=False, mac=None, key_id="not signed"), {"path": "p"}]
    got = _C_cpu.ledger_rows(list(rows), FIELDS, ledger._KINDS, ledger._SIGNED_AT, ledger._KEY_ID, ledger._MAC,
                             {BASE["key_id"]: KEY}, slow)
    assert got == _python([dict(r) for r in rows], {BASE["key_id"]: KEY})


def test_bad_arguments_never_show_the_key():
    secret = b"\x07secret-mac-key\x07" * 2
    for args in (([dict(BASE)], FIELDS, 5), ((dict(BASE),), FIELDS, ledger._KINDS),
                 ([dict(BASE)], FIELDS, ledger._KINDS[:-1])):
        with pytest.raises((TypeError, ValueError)) as exc:
            _C_cpu.ledger_rows(*args, ledger._SIGNED_AT, ledger._KEY_ID, ledger._MAC, {BASE["key_id"]: secret},
                               lambda r: [])
        assert "secret" not in str(exc.value) and secret.hex() not in str(exc.value)
    with pytest.raises(TypeError, match="bytes"):  # checked before the native encoder sees it
        Ledger().write([dict(BASE)], {BASE["key_id"]: "a str"})
