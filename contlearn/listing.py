"""Text for ``contlearn list``: every stream, learner and agent with its options and defaults."""

from __future__ import annotations

from contlearn.spec import FieldInfo, spec_fields


def _options(fields: list[FieldInfo], prefix: str = "") -> list[str]:
    lines = []
    for f in fields:
        default = f.default if f.default != "" else '""'
        extra = f" [{'|'.join(map(str, f.choices))}]" if f.choices else ""
        lines.append(f"      {prefix}{f.name} = {default}  {f.help}{extra}")
    return lines or ["      (no options)"]


def describe(what: str | None = None) -> str:
    """Streams, learners, credit rules and agents (or just ``what``) with their options."""
    from contlearn.agents import agents
    from contlearn.credit import credit_def, credit_rules
    from contlearn.envs import streams
    from contlearn.learners import learner_def, learners
    from contlearn.running.config import RunSpec
    from contlearn.running.plugins import agent_options

    out: list[str] = []
    if what in (None, "streams"):
        out.append("streams:")
        for name in streams.names():
            cls = streams.get(name)
            out.append(f"  {name}  {streams.entry(name).summary}")
            out.extend(_options(spec_fields(cls.Spec)))
    if what in (None, "learners"):
        out.append("learners:  (options are set as learner.<name>=value)")
        for name in learners.names():
            ldef = learner_def(name)
            sets = ", ".join(f"{k}={v}" for k, v in ldef.agent_defaults.items())
            out.append(f"  {name}  {ldef.summary}" + (f"  (sets {sets})" if sets else ""))
            out.extend(_options(spec_fields(ldef.Spec), "learner."))
    if what in (None, "credit"):
        out.append("credit rules:  (credit=<name>; options are set as credit.<name>=value)")
        for name in credit_rules.names():
            cdef = credit_def(name)
            learned = "  (learned feedback)" if cdef.learned else ""
            out.append(f"  {name}  {cdef.summary}{learned}")
            out.extend(_options(spec_fields(cdef.Spec), "credit."))
    if what in (None, "agents"):
        out.append("agents:  (or your own class: --agent module:Class)")
        for name in agents.names():
            cls = agents.get(name)
            fields = spec_fields(cls.Spec) if hasattr(cls, "Spec") else agent_options(cls)
            out.append(f"  {name}  {agents.entry(name).summary}")
            out.extend(_options(fields))
    if what is None:
        out.append("run options:")
        out.extend(_options(spec_fields(RunSpec)))
    return "\n".join(out)
