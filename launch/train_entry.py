"""Script form of ``python -m ds_structopt.train``, for launchers that only take a file path
(the deepspeed launcher's slurm and MPI modes run ``python -u <script> ...`` on every rank)."""
from ds_structopt.train import main

if __name__ == "__main__":
    main()
