from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest

import histoflow as hf

NAMESPACES = ["io", "datasets", "pp", "tl", "pl", "get"]


def _public_functions():
    for ns in NAMESPACES:
        mod = getattr(hf, ns)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isfunction(obj):
                yield f"{ns}.{name}", obj


@pytest.mark.parametrize(("name", "func"), list(_public_functions()), ids=lambda x: x if isinstance(x, str) else "")
def test_signature_conventions(name, func):
    sig = inspect.signature(func)
    positional = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) <= 3, f"{name} has {len(positional)} positional parameters"
    if "copy" in sig.parameters:
        p = sig.parameters["copy"]
        assert p.kind is p.KEYWORD_ONLY and p.default is False
    assert func.__doc__ and len(func.__doc__.strip()) > 40, f"{name} needs a docstring"
    documented = func.__doc__
    assert "{doc_" not in documented, f"{name}: unfilled shared-doc placeholder"
    for pname, p in sig.parameters.items():
        if pname == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        assert re.search(rf"^\s*(\w+, )*{pname}\b", documented, flags=re.M), (
            f"{name}: parameter {pname!r} is not documented"
        )


def test_import_is_light():
    code = (
        "import sys, histoflow; "
        "heavy = [m for m in ('torch', 'lightning', 'timm', 'scanpy', 'squidpy', 'spatialdata') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"`import histoflow` imported {out}"


def test_pp_import_does_not_import_torch():
    code = (
        "import sys, histoflow.pp, histoflow.io, histoflow.datasets; "
        "print('torch' in sys.modules, 'lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False False"


def test_lazy_submodules():
    assert set(hf.__all__) >= {"pp", "tl", "pl", "io", "datasets", "get", "models"}
    with pytest.raises(AttributeError):
        hf.does_not_exist  # noqa: B018


def test_doc_params_rejects_unknown_placeholders():
    from histoflow._docs import doc_params

    def f():
        """Text.

        {doc_nope}
        """

    with pytest.raises(KeyError, match="doc_nope"):
        doc_params()(f)
