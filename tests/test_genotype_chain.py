"""One owner for genotypes: a run's config reaches its genotype through each module once.

alb/genotype.py owns the genotype's forms (read, validate, write); modeling/genotype_source.py, one
layer up, binds it to the config and to checkpoints. The tests record, with ``sys.setprofile``,
every call that crosses from one elixir_d2 module into another while train_net's input checks
resolve a genotype, and while the checkpointer saves and loads one: each module must be entered
from one module only (so no module calls back up), the training command must hand the genotype
to one call, and that chain must be the layering above.
"""

import argparse
import ast
import os
import sys
from typing import Callable, List, Optional, Tuple

import yaml

import elixir_d2
from elixir_d2.checkpoint import AtomicCheckpointer
from elixir_d2.commands import train
from elixir_d2.modeling.alb.genotype import load_genotype

from genotype_helpers import swap_dilation, tiny_alb_head

PKG = os.path.dirname(os.path.abspath(elixir_d2.__file__))
REPO = os.path.dirname(PKG)
FIGURE3 = os.path.join(REPO, "configs", "genotypes", "figure3.yaml")
ALB_QS = os.path.join(REPO, "configs", "quickstart", "alb.yaml")

TRAIN = "commands/train.py"
SOURCE = "modeling/genotype_source.py"
OWNER = "modeling/alb/genotype.py"
SPACES = "modeling/alb/spaces.py"
PTH = "checkpoint_file.py"
CHECKPOINTER = "checkpoint.py"

Call = Tuple[Optional[str], str, str]  # (caller module, callee module, callee function)


def _module(frame) -> Optional[str]:
    path = frame.f_code.co_filename
    if not path.startswith(PKG + os.sep):
        return None
    return os.path.relpath(path, PKG).replace(os.sep, "/")


def _crossing_calls(fn: Callable[[], object]) -> List[Call]:
    """The calls ``fn`` makes from one elixir_d2 module into another, in order. Frames outside
    the package (torch, yaml, detectron2, generated dataclass methods) are looked through: a call
    is attributed to the nearest elixir_d2 frame below it."""
    calls: List[Call] = []

    def profile(frame, event, arg):
        callee = _module(frame) if event == "call" else None
        if callee is None or frame.f_code.co_name == "<module>":  # imports are not the chain
            return
        caller = frame.f_back
        while caller is not None and _module(caller) is None:
            caller = caller.f_back
        caller_module = _module(caller) if caller is not None else None
        if caller_module != callee:
            calls.append((caller_module, callee, frame.f_code.co_name))

    fn()  # once untraced: lazy imports happen here, not in the trace
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def _groups_below(calls: List[Call], root: str) -> List[List[Call]]:
    """``calls`` split at each call ``root`` makes into another module: one list per such call,
    holding it and everything it led to."""
    groups: List[List[Call]] = []
    for call in calls:
        if call[0] == root:
            groups.append([])
        if groups:
            groups[-1].append(call)
    return groups


def _callers(calls: List[Call]) -> dict:
    found: dict = {}
    for caller, callee, _ in calls:
        found.setdefault(callee, set()).add(caller)
    return found


def _genotype_chain(tmp_path, eval_only: bool, opts: List[str]) -> Tuple[List[Call], dict]:
    """The calls of train's check_inputs that reach the genotype owner, and the config."""
    args = argparse.Namespace(
        config_file=ALB_QS,
        opts=opts + ["OUTPUT_DIR", str(tmp_path)],
        resume=False,
        eval_only=eval_only,
    )
    result = {}
    calls = _crossing_calls(lambda: result.update(cfg=train.check_inputs(args)))
    reaching = [g for g in _groups_below(calls, TRAIN) if any(c[1] == OWNER for c in g)]
    assert len(reaching) == 1, f"train.py hands the genotype to {len(reaching)} calls: {reaching}"
    return reaching[0], result["cfg"]


def _assert_one_way(chain: List[Call]) -> None:
    callers = _callers(chain)
    entered_twice = {m: c for m, c in callers.items() if len(c) > 1}
    assert not entered_twice, f"modules entered from more than one module: {entered_twice}"


def test_eval_config_reaches_the_checkpoint_genotype_one_way(tmp_path):
    stored = swap_dilation(load_genotype(FIGURE3))  # not the config file's: it must come from
    AtomicCheckpointer(tiny_alb_head(stored), str(tmp_path)).save("model_final")  # the checkpoint
    weights = str(tmp_path / "model_final.pth")
    chain, cfg = _genotype_chain(
        tmp_path, True, ["MODEL.ALB.GENOTYPE", "", "MODEL.WEIGHTS", weights]
    )
    assert yaml.safe_load(cfg.MODEL.ALB.GENOTYPE_YAML) == stored.to_dict()
    _assert_one_way(chain)
    assert chain[0][:2] == (TRAIN, SOURCE) and chain[0][2] == "resolve_genotype_config"
    assert {(a, b) for a, b, _ in chain} == {
        (TRAIN, SOURCE),
        (SOURCE, PTH),
        (SOURCE, OWNER),
        (OWNER, SPACES),
    }


def test_training_config_reaches_the_file_genotype_one_way(tmp_path):
    chain, cfg = _genotype_chain(tmp_path, False, [])
    assert yaml.safe_load(cfg.MODEL.ALB.GENOTYPE_YAML) == load_genotype(FIGURE3).to_dict()
    _assert_one_way(chain)
    assert {(a, b) for a, b, _ in chain} == {(TRAIN, SOURCE), (SOURCE, OWNER), (OWNER, SPACES)}


def test_checkpointer_binds_genotypes_only_through_the_binding_layer(tmp_path):
    saved, loaded = tiny_alb_head(load_genotype(FIGURE3)), tiny_alb_head(load_genotype(FIGURE3))

    def save_and_load():
        AtomicCheckpointer(saved, str(tmp_path)).save("model_final")
        AtomicCheckpointer(loaded).load(str(tmp_path / "model_final.pth"))

    calls = _crossing_calls(save_and_load)
    callers = _callers(calls)
    assert callers[SOURCE] == {CHECKPOINTER}  # the save's entry and the load's check
    assert callers[OWNER] == {SOURCE}  # the checkpointer never parses or formats a genotype
    assert CHECKPOINTER not in {callee for caller, callee, _ in calls if caller == SOURCE}


def _package_imports(relpath: str) -> set:
    """elixir_d2 modules ``relpath`` imports (anywhere in it), as package-relative paths."""
    tree = ast.parse(open(os.path.join(PKG, relpath), encoding="utf-8").read())
    here = os.path.dirname(relpath).split("/") if os.path.dirname(relpath) else []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - (node.level - 1)]
            found.add("/".join(base + (node.module or "").split(".")).strip("/"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("elixir_d2."):
            found.add(node.module[len("elixir_d2.") :].replace(".", "/"))
    return found


def test_imports_follow_the_layers():
    assert _package_imports(OWNER) == {"modeling/alb/spaces"}
    assert _package_imports(SOURCE) == {"checkpoint_file", "cli", "modeling/alb/genotype"}
    assert "modeling/alb/genotype" not in _package_imports(CHECKPOINTER)
    assert "modeling/genotype_source" in _package_imports(CHECKPOINTER)
    assert "modeling/alb/genotype" not in _package_imports(TRAIN)
