"""Convert a task-1 network between PyCIL's IncrementalNet(resnet32) and dynammo's IncrementalNet(resnet32).
The option-A shortcut pads zero channels after the kept ones in PyCIL and on both sides in dynammo, so the
residual stream's channels are permuted; every layer that writes or reads the stream is permuted to match."""
import torch

N_BLOCKS = 5  # ResNet-32: 3 stages x 5 blocks


def stream_perms():
    """perm[s][i] = dynammo's channel for PyCIL's channel i of stage s's residual stream (s = 0 stem/stage 1)."""
    p1 = list(range(16))
    def grow(prev, width):
        half = (width - len(prev)) // 2
        kept = [half + prev[i] for i in range(len(prev))]
        free = [c for c in range(width) if c not in kept]
        return kept + free
    p2 = grow(p1, 32)
    p3 = grow(p2, 64)
    return [p1, p2, p3]


def pairs():
    """(pycil name, dynammo name, in-perm stage or None, out-perm stage or None) for every tensor prefix."""
    out = [("convnet.conv_1_3x3", "backbone.conv1", None, 0), ("convnet.bn_1", "backbone.bn1", None, 0)]
    for s in range(3):
        for j in range(N_BLOCKS):
            p, d = f"convnet.stage_{s+1}.{j}", f"backbone.layer{s+1}.{j}"
            cin = s - 1 if (j == 0 and s > 0) else s
            out += [(f"{p}.conv_a", f"{d}.conv1", cin, None), (f"{p}.bn_a", f"{d}.bn1", None, None),
                    (f"{p}.conv_b", f"{d}.conv2", None, s), (f"{p}.bn_b", f"{d}.bn2", None, s)]
    out += [("fc", "head.fc", 2, None)]
    return out


def pycil_to_dynammo(sd):
    perms = [torch.tensor(p) for p in stream_perms()]
    new = {}
    for p, d, pin, pout in pairs():
        for k, v in sd.items():
            if not k.startswith(p + "."):
                continue
            leaf = k[len(p) + 1:]
            v = v.clone()
            if pout is not None and v.dim() >= 1:
                w = torch.empty_like(v); w[perms[pout]] = v; v = w
            if pin is not None and v.dim() >= 2:
                w = torch.empty_like(v); w[:, perms[pin]] = v; v = w
            new[f"{d}.{leaf}"] = v
    return new


def dynammo_to_pycil(sd):
    perms = [torch.tensor(p) for p in stream_perms()]
    new = {}
    for p, d, pin, pout in pairs():
        for k, v in sd.items():
            if not k.startswith(d + "."):
                continue
            leaf = k[len(d) + 1:]
            v = v.clone()
            if pout is not None and v.dim() >= 1:
                v = v[perms[pout]]
            if pin is not None and v.dim() >= 2:
                v = v[:, perms[pin]]
            new[f"{p}.{leaf}"] = v
    return new
