"""`python -m federated.flower local [flags of main_fl_mr.py]`: a Flower study on this machine.
`python -m federated.flower certs DIR HOST [HOST ...]`: a CA and a SuperLink certificate for HOSTs.
`python -m federated.flower node-key PATH`: a SuperNode's key pair (PATH, PATH.pub)."""
import sys

from federated.flower.local import PROG, main

USAGE = f"""usage:
  {PROG} [flags of main_fl_mr.py, --node_wait S, --reply_timeout S, --insecure]
  python -m federated.flower certs DIR HOST [HOST ...]   (writes DIR/ca.crt, server.pem, server.key)
  python -m federated.flower node-key PATH               (writes PATH and PATH.pub)
A study across machines runs `flwr run` (see the README)."""

if __name__ == "__main__":
    command, args = sys.argv[1:2], sys.argv[2:]
    if command == ["local"]:
        sys.exit(main(args))
    from pathlib import Path

    from federated.flower.credentials import make_node_key, make_tls
    if command == ["certs"] and len(args) >= 2:
        for name, path in make_tls(Path(args[0]), args[1:]).items():
            print(f"{name}: {path}")
    elif command == ["node-key"] and len(args) == 1:
        for path in make_node_key(Path(args[0])):
            print(path)
    else:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
