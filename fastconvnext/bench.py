"""`python -m fastconvnext.bench`: the `fastconvnext bench` command at its former address. The harness is
fastconvnext.tooling.bench."""

if __name__ == "__main__":
    from fastconvnext.tooling.bench.cli import main

    raise SystemExit(main())
