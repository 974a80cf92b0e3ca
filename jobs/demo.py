"""The whole of ser-ray end to end on the embedded synthetic corpus, with an HTML report.

    python jobs/demo.py --out demo-out                       # starts and stops its own local Ray
    ray job submit --working-dir . -- python jobs/demo.py --address auto --out /tmp/demo-out
"""

import argparse
import logging

from ser_ray.demo import BUDGETS, DemoConfig, run_demo

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="demo-out")
parser.add_argument("--budget", default="small", choices=sorted(BUDGETS))
parser.add_argument("--address", default=None, help="Ray address to join; default: a local Ray")
parser.add_argument("--port", type=int, default=8000)


def main(argv: list[str] | None = None) -> None:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    run_demo(DemoConfig(out=args.out, budget=args.budget, address=args.address, port=args.port))


if __name__ == "__main__":
    main()
