"""The thin core every part stands on: params.yaml's typed blocks and the names it accepts, artifact paths,
atomic writes, errors, device choice, progress display, integrity checks, memory checks, stage timings and
Markdown output, and the method registry (`registry`, declarative) against which params.yaml's methods are
validated. It imports nothing from the rest of fang."""
