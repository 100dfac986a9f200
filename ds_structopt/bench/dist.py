"""dist suite (in progress)."""
def add_arguments(p):
    pass
def run_cli(args):
    raise ValueError("not yet")
