"""`backproplab report`: one self-contained HTML page (DIR/report.html) from results stores."""
from ..jsonout import emit_json


def register(sub, add_common):
    r = sub.add_parser("report", help="write OUT/report.html: one self-contained page (figures inline, no network) "
                                      "from the results store")
    add_common(r)
    r.add_argument("--store", action="append", metavar="DIR",
                   help="a results store to read (its folder or runs.db); repeat for several "
                        "(default: the --out folder's store)")


def cmd_report(args):
    from ..report.html import build_report
    stores = args.store or [args.out]
    res = build_report(stores, args.out)
    print(f"wrote {res['report']} ({res['bytes'] / 1e6:.2f} MB, {res['tables']} tables, {res['figures']} figures, "
          f"{res['seconds']:.1f} s): {', '.join(res['sections'])}")
    for name, why in res["left_out"].items():
        print(f"  left out {name}: {why}")
    if args.json:
        emit_json(res)
    return 0


COMMANDS = {"report": cmd_report}
