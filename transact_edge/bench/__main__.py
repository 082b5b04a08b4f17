"""The per-model worker's entry point: `python -m transact_edge.bench JOB`."""
import json
import sys

from transact_edge.bench.worker import measure

job = json.loads(sys.argv[1])
out = measure(job["runtime"], job["model"], [tuple(c) for c in job["cases"]], job["threads"], job["reps"],
              job["vocab"])
print(json.dumps(out))

