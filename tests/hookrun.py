"""`p3d.train` with the test hooks named in P3D_TEST_HOOKS installed (see tests/hooks.py).

    python tests/hookrun.py key=value ...                        one process
    torchrun --nproc-per-node N tests/hookrun.py key=value ...   torchrun's workers
    python tests/hookrun.py --p3d-train [torchrun options] key=value ...
        `p3d train` itself (validation, torchrun in-process, its exit codes), whose torchrun
        starts this script as the worker instead of `-m p3d.train`

tests/forkrun.py installs the same hooks before it forks its ranks.
"""

from __future__ import annotations

import sys

import hooks


def workers_run_this_script() -> None:
    """`p3d train` hands torchrun `-m p3d.train ...`; its workers run this file instead."""
    import torch.distributed.run as torchrun

    def make(parse_args):
        def parsed(argv):
            args = parse_args(argv)
            if args.module and args.training_script == "p3d.train":
                args.module, args.training_script = False, __file__
            return args

        return parsed

    hooks.wrap(torchrun, "parse_args", make)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--p3d-train"]:
        import p3d.cli

        workers_run_this_script()
        p3d.cli.main(["train", *args[1:]])
        return
    hooks.install_from_env()
    import p3d.train

    p3d.train.main(args)


if __name__ == "__main__":
    main()
