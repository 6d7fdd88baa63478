"""The D2R module chain's two paths, PyTorch per gate and native on the CPU, against the
specification (:func:`~d2r_torchrl.modules.d2r_spec.module_chain`) and each other.

``test_gradients_match_a_gate_by_gate_implementation`` (test_d2r_network.py) checks both
paths inside a whole network; these tests cover what that small network does not: several
members, ragged sample blocks, float32, detached parameters, threads, vmapped ensembles,
the fallbacks, and what building the extension shows.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension  # its load is replaced in some tests

import d2r_torchrl.modules.native_chain as native_chain
from d2r_torchrl.modules.actor_critic import make_critic
from d2r_torchrl.modules.d2r_spec import module_chain
from d2r_torchrl.modules.module_chain import NATIVE_BLOCK, run_chain
from d2r_torchrl.modules.routing import set_routing_mode
from tensordict import TensorDict

ROOT = Path(__file__).resolve().parents[1]


def chain_inputs(
    members: int, batch: int, width: int, modules: int, slots: int, dtype: torch.dtype, res_routing: bool, seed: int = 0
) -> dict:
    """Random chain inputs in :class:`ModuleChain`'s layout: gate ``g`` reads ``slots`` of its
    ``g + 1`` candidates (repeats allowed, as padding slots are), with weights summing to 1."""
    generator = torch.Generator().manual_seed(seed)
    gate = torch.arange(modules).view(modules, 1, 1, 1)
    index = (torch.rand(modules, members, batch, slots, generator=generator) * (gate + 1)).long()
    weight = torch.softmax(torch.randn(modules, members, batch, slots, generator=generator, dtype=dtype), -1)
    endorsed = (torch.rand(modules, members, batch, slots, generator=generator) > 0.4).to(dtype) if res_routing else None
    module_weight = torch.randn(members, modules - 1, width, width, generator=generator, dtype=dtype) / width**0.5
    module_bias = 0.1 * torch.randn(members, modules - 1, width, generator=generator, dtype=dtype)
    params = [module_weight.requires_grad_(), module_bias.requires_grad_()]
    first = torch.randn(members, batch, width, generator=generator, dtype=dtype).requires_grad_()
    return dict(first=first, index=index, weight=weight.requires_grad_(), endorsed=endorsed, params=params)


def run_with_gradients(inputs: dict, native: bool, direction: torch.Tensor) -> list[torch.Tensor]:
    """The chain's output and the gradients of ``(output * direction).sum()`` w.r.t. every
    differentiable input that requires one."""
    output = run_chain(
        inputs["first"], inputs["index"], inputs["weight"], inputs["endorsed"], *inputs["params"], native=native
    )
    return [output, *_gradients(output, inputs, direction)]


def specified(inputs: dict, direction: torch.Tensor) -> list[torch.Tensor]:
    """:func:`run_with_gradients` of the specification: the slots scattered into dense
    ``[E, B, N, N]`` weights (repeated sources add up) and endorsement, members under vmap."""
    index, weight, endorsed = (t.movedim(0, 2) if t is not None else None
                               for t in (inputs["index"], inputs["weight"], inputs["endorsed"]))
    modules = index.shape[-2]
    dense = weight.new_zeros(*weight.shape[:-1], modules).scatter_add(-1, index, weight)
    if endorsed is not None:
        endorsed = torch.zeros(dense.shape, dtype=torch.bool).scatter(-1, index, endorsed.bool())
    output = torch.vmap(module_chain, (0, 0, None if endorsed is None else 0, 0, 0))(
        inputs["first"], dense, endorsed, *inputs["params"]
    )
    return [output, *_gradients(output, inputs, direction)]


def _gradients(output: torch.Tensor, inputs: dict, direction: torch.Tensor) -> tuple[torch.Tensor, ...]:
    wrt = [t for t in (inputs["first"], inputs["weight"], *inputs["params"]) if t.requires_grad]
    return torch.autograd.grad((output * direction).sum(), wrt)


@pytest.mark.parametrize("res_routing", [True, False])
@pytest.mark.parametrize("native", [False, True], ids=["pytorch", "native"])
def test_chain_paths_match_the_specification(res_routing: bool, native: bool) -> None:
    """Both paths against the specification, float64: 2 members, 3 slots per gate (gates 0
    and 1 repeat a source), a ragged native block; endorsement given per source (a slot
    repeating a source repeats its endorsement, as routing gives it)."""
    if native:
        assert native_chain.load_native_chain() is not None, "the native extension could not be built"
    inputs = chain_inputs(2, NATIVE_BLOCK + 9, 8, 6, 3, torch.float64, False)
    if res_routing:  # per (gate, member, sample, source), read at each slot
        per_source = torch.rand(*inputs["index"].shape[:-1], 6, generator=torch.Generator().manual_seed(5)) > 0.4
        inputs["endorsed"] = per_source.gather(-1, inputs["index"]).double()
    direction = torch.randn(2, NATIVE_BLOCK + 9, 8, dtype=torch.float64)
    for got, want in zip(run_with_gradients(inputs, native, direction), specified(inputs, direction), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("width", [16, 12])  # 12: the matrices' transpose has partial tiles
@pytest.mark.parametrize("res_routing", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_pass_matches_the_per_gate_path(res_routing: bool, dtype: torch.dtype, width: int) -> None:
    # 3 members, 2 blocks and a ragged one, 3 slots: gates 0 and 1 have padding slots
    batch = 2 * NATIVE_BLOCK + 22
    inputs = chain_inputs(3, batch, width, 6, 3, dtype, res_routing)
    direction = torch.randn(3, batch, width, dtype=dtype)
    assert native_chain.load_native_chain() is not None, "the native extension could not be built"
    expected = run_with_gradients(inputs, False, direction)
    native = run_with_gradients(inputs, True, direction)
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for got, want in zip(native, expected, strict=True):
        torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("res_routing", [True, False])
def test_native_pass_skips_the_modules_a_route_does_not_reach(res_routing: bool) -> None:
    """Only the output gate can read the last module; here it never does, so that module is
    not computed: not-a-number parameters in it leave every value and gradient as with
    finite ones (the per-gate path, which computes every module, would spread them through
    its input-gradient product, 0 * nan)."""
    inputs = chain_inputs(2, NATIVE_BLOCK + 9, 8, 6, 2, torch.float64, res_routing)
    inputs["index"][-1].clamp_(max=4)  # the output gate reads modules 0..4, never module 5
    module_weight, module_bias = (p.detach() for p in inputs["params"])
    poisoned = [module_weight.clone(), module_bias.clone()]
    poisoned[0][:, -1] = float("nan")
    poisoned[1][:, -1] = float("nan")
    finite = [module_weight.clone().requires_grad_(), module_bias.clone().requires_grad_()]
    direction = torch.randn(2, NATIVE_BLOCK + 9, 8, dtype=torch.float64)
    expected = run_with_gradients({**inputs, "params": finite}, False, direction)
    native = run_with_gradients({**inputs, "params": [p.requires_grad_() for p in poisoned]}, True, direction)
    assert (expected[-1][:, -1] == 0).all() and (expected[-2][:, -1] == 0).all()  # no gradient reaches it
    for got, want in zip(native, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_native_pass_with_detached_parameters_returns_no_parameter_gradients() -> None:
    inputs = chain_inputs(2, 40, 8, 5, 2, torch.float64, True)
    inputs["params"] = [p.detach() for p in inputs["params"]]
    direction = torch.randn(2, 40, 8, dtype=torch.float64)
    expected = run_with_gradients(inputs, False, direction)
    native = run_with_gradients(inputs, True, direction)
    assert len(native) == 3  # output, first, weight
    for got, want in zip(native, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: oneDNN's kernels, one cache per thread
def test_native_pass_gives_the_same_result_on_two_threads(dtype: torch.dtype) -> None:
    inputs = chain_inputs(2, 3 * NATIVE_BLOCK, 16, 6, 2, dtype, True)
    direction = torch.randn(2, 3 * NATIVE_BLOCK, 16, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_with_gradients(inputs, True, direction)
        torch.set_num_threads(2)
        two = run_with_gradients(inputs, True, direction)
    finally:
        torch.set_num_threads(threads)
    # only the parameter gradients' per-thread partial sums are added in another order
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for got, want in zip(two, one, strict=True):
        torch.testing.assert_close(got, want, **tolerance)


def test_vmapped_native_critics_match_the_per_gate_path() -> None:
    """Twin D2R critics under ``torch.vmap`` (as the loss runs them): values and gradients."""
    small = dict(num_modules=5, module_width=16, top_k=2, encoder_widths=(24, 20), router_widths=(18,))
    critics = []
    for seed in range(2):
        torch.manual_seed(seed)
        critics.append(make_critic("d2r", 6, 2, 3, **small))
    params = TensorDict.from_modules(*critics, as_module=True)
    generator = torch.Generator().manual_seed(3)
    data = TensorDict(
        {
            "observation": torch.randn(70, 6, generator=generator),
            "action": torch.rand(70, 2, generator=generator) * 2 - 1,
            "task_id": torch.randint(0, 3, (70,), generator=generator),
        },
        [70],
    )

    def values(native: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        critics[0].network.native_chain = native

        def call(p: TensorDict, td: TensorDict) -> torch.Tensor:
            with p.to_module(critics[0]):
                return critics[0](td)["state_action_value"]

        with set_routing_mode("topk"):
            out = torch.vmap(call, (0, None))(params, data.clone())
        leaves = [leaf for leaf in params.values(True, True) if leaf.requires_grad]
        return out, list(torch.autograd.grad(out.square().sum(), leaves, allow_unused=True, materialize_grads=True))

    expected, expected_grads = values(False)
    native, native_grads = values(True)
    torch.testing.assert_close(native, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(native_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_native_pass_steps_aside_under_torch_compile() -> None:
    """Inside ``torch.compile`` the chain traces its per-gate path (the extension is opaque
    to the compiler): one graph, the same values and gradients."""
    inputs = chain_inputs(1, 20, 8, 4, 2, torch.float32, True)
    direction = torch.randn(1, 20, 8)
    expected = run_with_gradients(inputs, True, direction)

    def step(first, weight, *params):
        out = run_chain(first, inputs["index"], weight, inputs["endorsed"], *params, native=True)
        return (out * direction).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = (inputs["first"], inputs["weight"], *inputs["params"])
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(loss, (expected[0] * direction).sum())
    for got, want in zip(grads, expected[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_an_extension_that_cannot_be_built_warns_and_leaves_the_per_gate_path(monkeypatch) -> None:
    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension 'd2r_module_chain': g++: command not found")

    monkeypatch.setattr(native_chain, "_extension", None)
    monkeypatch.setattr(native_chain, "_unavailable", None)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with pytest.warns(UserWarning, match="could not be built .*g\\+\\+: command not found.*compile.native_chain=false"):
        assert native_chain.load_native_chain() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert native_chain.load_native_chain() is None
    inputs = chain_inputs(1, 12, 8, 4, 2, torch.float64, True)
    direction = torch.randn(1, 12, 8, dtype=torch.float64)
    for got, want in zip(
        run_with_gradients(inputs, True, direction),
        run_with_gradients(inputs, False, direction),
        strict=True,
    ):
        torch.testing.assert_close(got, want)


def test_native_pass_rejects_a_gate_reading_a_later_module() -> None:
    """A source past the gate's candidates would read a module not computed yet: an error
    naming the gate and the module, not a silent read of uninitialised memory."""
    inputs = chain_inputs(1, 10, 8, 4, 2, torch.float32, False)
    inputs["index"][1, 0, 7, 1] = 3  # gate 1 may read modules 0 and 1
    with pytest.raises(RuntimeError, match="gate 1 reads module 3; a gate can only read modules 0..1"):
        run_chain(inputs["first"], inputs["index"], inputs["weight"], None, *inputs["params"], native=True)


def test_a_first_build_says_what_it_does_and_for_how_long_before_it_starts(monkeypatch, tmp_path, capsys) -> None:
    """One line on stderr before the compiler starts, none once the build is cached."""
    said_before_loading, calls = [], []

    def compile_here(**kwargs):
        said_before_loading.append(capsys.readouterr().err)
        calls.append(kwargs)
        raise RuntimeError("no build in this test")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", compile_here)
    for built in (False, True):
        monkeypatch.setattr(native_chain, "_extension", None)
        monkeypatch.setattr(native_chain, "_unavailable", None)
        if built:  # what a finished build leaves in its folder
            (Path(calls[0]["build_directory"]) / f"{calls[0]['name']}.so").write_bytes(b"")
        with pytest.warns(UserWarning, match="no build in this test"):
            assert native_chain.load_native_chain() is None
    first, cached = said_before_loading
    [line] = first.splitlines()
    assert line.startswith("Compiling D2R's native CPU module chain") and "about a minute" in line
    assert str(tmp_path) in line and cached == ""
    assert [call["with_cuda"] for call in calls] == [False, False]


def test_each_source_tree_builds_in_a_folder_of_its_own(monkeypatch, tmp_path) -> None:
    """Two checkouts (or an edited source) never rebuild over each other's cached build."""
    flags = ["-O3"]
    here = native_chain.build_name(flags)
    assert here == native_chain.build_name(flags) and here != native_chain.build_name(["-O2"])
    copy = tmp_path / "csrc"
    shutil.copytree(native_chain.CSRC, copy)
    monkeypatch.setattr(native_chain, "CSRC", copy)
    elsewhere = native_chain.build_name(flags)
    (copy / "native.h").write_text((copy / "native.h").read_text() + "\n")
    assert len({here, elsewhere, native_chain.build_name(flags)}) == 3


def test_loading_on_a_machine_without_a_gpu_shows_no_cuda_notice(tmp_path) -> None:
    """Importing torch's extension builder logs "No CUDA runtime is found, using CUDA_HOME=..."
    where torch was built for CUDA, CUDA_HOME is set and no GPU is visible; the CPU-only
    extension never uses CUDA, so the notice is not shown. The script reloads the builder
    afterwards to show that the notice would be printed there."""
    if not torch.version.cuda:
        pytest.skip("a torch built without CUDA never looks for it")
    assert native_chain.load_native_chain() is not None  # built here, so the script only loads it
    script = (
        "import importlib, sys\n"
        "from d2r_torchrl.modules.native_chain import load_native_chain\n"
        "assert load_native_chain() is not None\n"
        "print('loaded', file=sys.stderr, flush=True)\n"
        "import torch.utils.cpp_extension\n"
        "importlib.reload(torch.utils.cpp_extension)\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", CUDA_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    loading, reloading = result.stderr.split("loaded\n")
    assert "No CUDA runtime is found" not in loading and "Compiling" not in loading, loading
    assert "No CUDA runtime is found" in reloading
