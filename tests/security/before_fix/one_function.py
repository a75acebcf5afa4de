"""Run one test function of a main test module against whatever lepton_edge is importable (the old tree).

    one_function.py FILE NAME

Only that function (and its ``pytest.mark.parametrize`` cases, each run and reported on its own) is
compiled, with the importable ``protocol``'s public names in its namespace: the module's own imports
may name things the old code lacks. Exit status 1 when any case failed.
"""
import ast
import sys

import pytest

import lepton_edge
from lepton_edge import protocol
from lepton_edge.errors import ProtocolError

path, name = sys.argv[1], sys.argv[2]
tree = ast.parse(open(path).read())
fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
ns = {"pytest": pytest, "ProtocolError": ProtocolError, "p": protocol,
      **{k: getattr(protocol, k) for k in dir(protocol) if not k.startswith("_")}}
cases: list[dict] = [{}]
for deco in fn.decorator_list:
    # @pytest.mark.parametrize("a, b", [...]) (ids= is ignored): the cases, evaluated in the same namespace.
    if isinstance(deco, ast.Call) and ast.unparse(deco.func).endswith("mark.parametrize"):
        names = [s.strip() for s in ast.literal_eval(deco.args[0]).split(",")]
        values = eval(compile(ast.Expression(deco.args[1]), path, "eval"), ns)
        cases = [dict(zip(names, v if len(names) > 1 else (v,))) for v in values]
fn.decorator_list = []
exec(compile(ast.Module([fn], []), path, "exec"), ns)
print("lepton_edge from", lepton_edge.__file__)
failed = 0
for i, kwargs in enumerate(cases):
    label = f"[{i}] {str(kwargs)[:90]}" if kwargs else ""
    try:
        ns[name](**kwargs)
    except BaseException as e:
        failed += 1
        print("FAILED", label, type(e).__name__, (str(e).splitlines() or [""])[0][:160])
    else:
        print("passed", label)
print(f"{name}: {failed} of {len(cases)} failed")
sys.exit(1 if failed else 0)
