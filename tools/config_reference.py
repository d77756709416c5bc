"""Print the config reference table, or with --write refresh it inside README.md."""

import argparse
import pathlib

from megatron_vgpo.config.reference import BEGIN, END, config_reference_markdown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--write", action="store_true", help="rewrite the table between the README markers")
    p.add_argument("--readme", default=str(pathlib.Path(__file__).resolve().parents[1] / "README.md"))
    args = p.parse_args()
    table = config_reference_markdown()
    if not args.write:
        print(table)
        return
    path = pathlib.Path(args.readme)
    text = path.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


if __name__ == "__main__":
    main()
