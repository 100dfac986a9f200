"""One simulated GPU rank of an N-rank world on a CPU (torch's fake tensors and fake process group).

Used by ``ds-structopt bench scale`` and the GPU-path tests: our real distributed step runs
as rank r of N with ``device="cuda"`` fake tensors (no memory, no values), every collective
checked as NCCL would, host reads counted (``collectives.HostSyncs``) and live tensor bytes
tracked (``memory.LiveBytes``). DeepSpeed's layouts come from DeepSpeed's own functions
(``world.py``). Nothing of ds_structopt is replaced.
"""
