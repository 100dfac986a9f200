import sys, collections
from ds_structopt.bench import scale
import ds_structopt.bench.scale as sc
import ds_structopt.sim.clock as clock
sites = collections.Counter()
orig_tf = clock.TorchTime.__torch_function__
active = {"on": False}
def tf(self, func, types, args=(), kwargs=None):
    if active["on"]:
        f = sys._getframe(1)
        while f and ("ds_structopt/" not in f.f_code.co_filename or "/sim/" in f.f_code.co_filename or "torch/" in f.f_code.co_filename):
            f = f.f_back
        sites[(f.f_code.co_filename.split("ds_structopt/")[-1], f.f_lineno, getattr(func, "__name__", str(func))) if f else "?"] += 1
    return orig_tf(self, func, types, args, kwargs)
clock.TorchTime.__torch_function__ = tf
import ds_structopt.sim.world as w
orig = w.Zero3.step
count = {"n": 0}
def step(self, *a):
    count["n"] += 1
    active["on"] = count["n"] == 3
    r = orig(self, *a); active["on"] = False; return r
w.Zero3.step = step
sc.STEPS = 3; sc.PLAIN_STEPS = (2, 3); sc.REFRESH_STEP = 3
cfg = scale.Config(1024, "70b", 3, "flat", "AdaDiag++")
scale.simulate(cfg, int(sys.argv[1]) if len(sys.argv) > 1 else 0)
for k, v in sites.most_common(30): print(v, k)
print(sum(sites.values()))
