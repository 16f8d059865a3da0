"""`python -m federated.flower local [flags of main_fl_mr.py]`: a Flower study on this machine."""
import sys

from federated.flower.local import PROG, main

if __name__ == "__main__":
    if sys.argv[1:2] != ["local"]:
        print(f"usage: {PROG} [flags of main_fl_mr.py and --node_wait, --reply_timeout, --insecure]\n"
              "  (a multi-machine study runs `flwr run`, see the README)", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[2:]))
