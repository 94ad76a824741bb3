"""The thin core every part stands on: params.yaml's typed blocks and the names it accepts, artifact paths,
atomic writes, errors, device choice, progress display, integrity checks, memory checks, stage timings and
Markdown output. It imports nothing from the rest of fang but the method registry (`fang.methods.registry`,
declarative), against which params.yaml's methods are validated."""
