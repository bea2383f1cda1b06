"""The check harness the client scripts share: each check is a function decorated with
`checks.check(name)`; it runs at once, prints `ok` or `FAIL` (with the traceback), and a
failure does not stop the others. `checks.exit_code(label)` prints the summary and returns
the process's exit code.
"""

import traceback


class Checks:
    def __init__(self):
        self.failures = []

    def check(self, name):
        def run(fn):
            try:
                fn()
                print(f"ok   {name}", flush=True)
            except Exception:  # report every failure, not only the first
                self.failures.append(name)
                print(f"FAIL {name}", flush=True)
                traceback.print_exc()
            return fn

        return run

    def exit_code(self, label):
        if self.failures:
            print(
                f"{label}: {len(self.failures)} check(s) failed: {self.failures}",
                flush=True,
            )
            return 1
        print(f"{label}: every check passed", flush=True)
        return 0
