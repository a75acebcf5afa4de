"""Run one test function of a main test module against whatever lepton_edge is importable (the old tree)."""
import ast, sys, traceback
import pytest
import lepton_edge
from lepton_edge import protocol
from lepton_edge.errors import ProtocolError

path, name = sys.argv[1], sys.argv[2]
tree = ast.parse(open(path).read())
fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
ns = {"pytest": pytest, "ProtocolError": ProtocolError, "p": protocol, **{k: getattr(protocol, k) for k in dir(protocol) if not k.startswith("_")}}
exec(compile(ast.Module([fn], []), path, "exec"), ns)
print("lepton_edge from", lepton_edge.__file__)
try:
    ns[name]()
except BaseException as e:
    print("FAILED:", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    sys.exit(1)
print("passed")
