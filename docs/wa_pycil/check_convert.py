import sys, torch
sys.path.insert(0, "/work/scratch/pycil"); sys.path.insert(0, "/work/scratch/swap")
torch.set_num_threads(1); torch.manual_seed(0)
from convert import pycil_to_dynammo, dynammo_to_pycil
from utils.inc_net import IncrementalNet as PNet
from dynammo.models.network import IncrementalNet as DNet
from dynammo.models.backbones import build_backbone
pn = PNet({"convnet_type": "resnet32", "backbone_type": "resnet32"}, False); pn.update_fc(2)
for mod in pn.modules():  # random BN statistics and affine, so the check sees them
    if isinstance(mod, torch.nn.BatchNorm2d):
        mod.running_mean.normal_(); mod.running_var.uniform_(0.5, 2); mod.weight.data.normal_(); mod.bias.data.normal_()
dn = DNet(build_backbone("resnet32", False)); dn.head.expand(2)
dn.load_state_dict(pycil_to_dynammo(pn.state_dict()), strict=True)
x = torch.randn(8, 3, 32, 32)
back = dynammo_to_pycil(dn.state_dict())
print("round trip gives back every tensor:", all(torch.equal(back[k], v) for k, v in pn.state_dict().items() if not k.startswith("convnet.fc")))
pn.eval(); dn.eval()
a, b = pn(x)["logits"], dn(x)
print("pycil->dynammo eval max diff", (a - b).abs().max().item(), a.abs().max().item())
pn.train(); dn.train()
print("train-mode max diff", (pn(x)["logits"] - dn(x)).abs().max().item())
pn2 = PNet({"convnet_type": "resnet32", "backbone_type": "resnet32"}, False); pn2.update_fc(2)
r = pn2.load_state_dict(dynammo_to_pycil(dn.state_dict()), strict=False); assert r.missing_keys == ["convnet.fc.weight", "convnet.fc.bias"] and not r.unexpected_keys, r; pn2.eval(); dn.eval()
print("dynammo->pycil round trip", (pn2(x)["logits"] - dn(x)).abs().max().item())
