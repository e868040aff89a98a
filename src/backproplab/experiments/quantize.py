"""int8 and bf16 versions of a trained run, through PyTorch's maintained quantization path.

torch.ao.quantization (eager and FX modes) is deprecated in torch 2.13; its successor is
torchao's PT2E flow: torch.export captures the model as an ATen graph, a backend's
quantizer annotates it, prepare_pt2e inserts observers, a calibration pass over training
digits records activation ranges, convert_pt2e folds the weights to int8 and leaves
quantize / dequantize pairs that torch.compile (inductor) lowers to int8 kernels.

Why X86InductorQuantizer: it is the quantizer for this machine's backend (x86 CPU, oneDNN
int8 convolutions and matrix products through inductor), its default is what the issue
asks for (int8 weights per output channel, symmetric; uint8 activations per tensor,
affine, from histogram observers), and it annotates the graph's 2-D convolutions (grouped
ones too: the depthwise layers of the efficient blocks) and linear layers. The other
PT2E quantizers are for other backends (XNNPACK for mobile / ExecuTorch, the embedded
ones). The quantizer matches torch.nn modules' ops (conv2d / linear with a parameter
weight): Net1989's forward builds H2's weight from its connection table (index_put) and
multiplies with @, so it is exported through `deployable`, the same function written with
nn.Conv2d and nn.Linear (the table's zeros stay exact zeros in int8: the weight scale is
symmetric, zero point 0), and the convnet family through models/convnet.torch_layers.

QAT: the run's weights are fine-tuned on the population engine with the registered method qat
(methods/qat.py: the conv and linear weights fake-quantized per output channel with the
quantizer's own weight scheme, straight-through gradients; on the numba kernel path where the
run's net allows it), with the run's own recipe at a small constant rate, then converted as PTQ
is: the int8 weights PT2E stores are the fake-quantized weights the fine-tuning trained at.

The converted graph is evaluated eagerly (its quantize / dequantize pairs reproduce the
int8 numbers in float32 arithmetic); benchmarks/bench_quantize.py times it compiled.
"""
import io
import math
import warnings

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserError

CAL_DIGITS = 512      # training digits the activation observers see
EVAL_CHUNK = 2048


class Deploy1989(nn.Module):
    """Net1989 (ReLU, logits) as torch.nn layers: same numbers, quantizable ops."""

    def __init__(self, params: dict):
        super().__init__()
        from ..models.net1989 import H2_TABLE
        t = {k: torch.tensor(np.asarray(v), dtype=torch.float32) for k, v in params.items()}  # copies
        self.pad1, self.pad2 = nn.ConstantPad2d(2, -1.0), nn.ConstantPad2d(2, -1.0)  # one module a use: the
        self.h1 = nn.Conv2d(1, 12, 5, stride=2, bias=False)
        self.h2 = nn.Conv2d(12, 12, 5, stride=2, bias=False)
        self.h3, self.out = nn.Linear(192, 30), nn.Linear(30, 10)
        dense = torch.zeros(12, 12, 5, 5)
        dense[torch.arange(12)[:, None], torch.from_numpy(H2_TABLE)] = t["h2_w"]
        with torch.no_grad():
            self.h1.weight.copy_(t["h1_w"])
            self.h2.weight.copy_(dense)
            self.h3.weight.copy_(t["h3_w"]), self.h3.bias.copy_(t["h3_b"])
            self.out.weight.copy_(t["out_w"]), self.out.bias.copy_(t["out_b"])
        self.h1_b, self.h2_b = nn.Parameter(t["h1_b"]), nn.Parameter(t["h2_b"])   # one bias per unit
        self.act1, self.act2, self.act3 = nn.ReLU(), nn.ReLU(), nn.ReLU()  # quantizer's partitions are by module

    def forward(self, x):
        x = self.act1(self.h1(self.pad1(x)) + self.h1_b)
        x = self.act2(self.h2(self.pad2(x)) + self.h2_b)
        return self.out(self.act3(self.h3(x.flatten(1))))


def deployable(cfg_model, params: dict, resolution: int = 16) -> nn.Module:
    """A trained replica's weights ({name: array}) -> the same net as torch.nn layers, eval mode."""
    if cfg_model.name == "net1989":
        if cfg_model.act != "relu" or cfg_model.out_act != "none":
            raise UserError(f"quantize takes ReLU nets with logits out; this run has model.act={cfg_model.act}, "
                            f"model.out_act={cfg_model.out_act}")
        from ..models.net1989 import PARAM_NAMES
        if sorted(params) != sorted(PARAM_NAMES):
            extra = sorted(set(params) - set(PARAM_NAMES))
            raise UserError(f"quantize takes the plain 1989 net; this run's model has {', '.join(extra)}")
        return Deploy1989(params).eval()
    if cfg_model.name == "convnet":
        from ..models.convnet import torch_layers
        from ..models.registry import build_model
        net = build_model(cfg_model, 0, resolution)
        try:
            net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in params.items()})
        except RuntimeError as e:
            raise UserError(f"the run's weights do not fit its convnet: {e}") from None
        return torch_layers(net).eval()
    raise UserError(f"quantize takes net1989 and convnet runs, not model.name={cfg_model.name} "
                    f"(attention and the SSM's complex scan have no int8 path in PT2E's x86 quantizer)")


def _quiet():
    """torchao warns on import about optional CUDA libraries this CPU build lacks (and torch about
    one of its enums): not the user's business."""
    import logging
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="torchao")
    warnings.filterwarnings("ignore", message=".*(KernelPreference|deprecated|TypedStorage).*")


def _quantizer(qat: bool):
    _quiet()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    q = xiq.X86InductorQuantizer()
    q.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=qat))
    return q


def _export(model: nn.Module, example: torch.Tensor):
    """The ATen graph with a symbolic batch size (calibration, evaluation and latency batches differ)."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()


def ptq(model: nn.Module, calib: torch.Tensor) -> nn.Module:
    """Post-training quantization: export, annotate, calibrate on `calib` (N, 1, s, s), convert."""
    q = _quantizer(False)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    with torch.no_grad():
        gm = _export(model, calib[:8])
        prepared = prepare_pt2e(gm, q)
        for a in range(0, len(calib), 256):
            prepared(calib[a:a + 256])
        return convert_pt2e(prepared)


def qat_finetune(cfg, reps: list, x: np.ndarray, labels: np.ndarray, passes: int, lr: float,
                 seeds: list) -> tuple[list, str]:
    """Quantization-aware fine-tuning on the engine: a population of the run's replicas (`reps`,
    per replica {name: array}, seeds `seeds`) starting from their weights, the run's recipe and
    methods plus +method=qat, `passes` passes over (x (n, r, r), labels) at the constant rate lr
    (AdamW's or the run's optimizer's state starts afresh). -> (per replica {name: array} of the
    fine-tuned float weights, the engine path that ran)."""
    from ..config import validate
    from ..engine.population import Population, train_passes
    from ..methods.registry import with_method
    c = with_method(cfg, "qat")
    c.train.passes, c.train.seeds, c.optim.lr, c.optim.lr_end = int(passes), len(reps), float(lr), None
    validate(c)
    torch.set_num_threads(c.train.threads)
    eng = Population(c, seeds)
    missing = sorted(set(eng.names) - set(reps[0]))
    if missing:
        raise UserError(f"the run's weights lack {', '.join(missing)} of the engine's {c.model.name}")
    with torch.no_grad():
        eng.W.copy_(torch.stack([torch.cat([torch.as_tensor(np.asarray(p[n], dtype=np.float32)).reshape(-1)
                                            for n in eng.names]) for p in reps]))
    train_passes(eng, np.ascontiguousarray(x, dtype=np.float32), np.asarray(labels), int(passes), label="qat pass")
    return eng.params(), eng.path


@torch.no_grad()
def error(model, x: torch.Tensor, labels: torch.Tensor, dtype=torch.float32) -> float:
    """Percent of misclassified digits, in batches of EVAL_CHUNK."""
    wrong = 0
    for a in range(0, len(x), EVAL_CHUNK):
        out = model(x[a:a + EVAL_CHUNK].to(dtype)).float()
        wrong += int((out.argmax(1) != labels[a:a + EVAL_CHUNK]).sum())
    return 100.0 * wrong / len(x)


def _stored(model: nn.Module) -> dict:
    """name -> tensor of what the model computes with: for a converted graph, the attributes its
    get_attr nodes read (convert_pt2e leaves the float weights on the module, unused)."""
    if isinstance(model, torch.fx.GraphModule):
        out = {}
        for node in model.graph.nodes:
            if node.op == "get_attr":
                t = model
                for part in node.target.split("."):
                    t = getattr(t, part)
                if torch.is_tensor(t):
                    out[node.target] = t
        return out
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of what the model stores: `weights` (the convolution and linear weights: int8 in a
    converted graph, *.weight otherwise), `other` (biases, per-unit biases, per-channel scales and
    zero points) and `serialized` (torch.save of all of them)."""
    w = other = 0
    tensors = _stored(model)
    for name, t in tensors.items():
        nb = t.numel() * t.element_size()
        if t.dtype == torch.int8 or name.endswith(".weight"):
            w += nb
        else:
            other += nb
    buf = io.BytesIO()
    torch.save({k: v.clone() for k, v in tensors.items()}, buf)
    return {"weights": w, "other": other, "serialized": len(buf.getvalue())}


def bf16(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model).to(torch.bfloat16).eval()


def summarize(errs: list[float]) -> dict:
    a = np.asarray(errs, float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


def nan_if_empty(v):
    return v if v is not None else math.nan
