"""The shape of our schedule rules: match a PrimFunc's structure, list the configurations
that fit it (the hand-picked default first), schedule one.

``apply`` is DLight's rule interface (what the build pass calls): the default
configuration, or None when the pattern does not match. ``space`` is what the tuner
uses: one schedule per configuration, each replayable from its trace, so MetaSchedule
can measure our whole family of tilings next to its own search space.
"""

from __future__ import annotations

import logging

from xcompile.errors import first_line

log = logging.getLogger(__name__)

# MetaSchedule's annotation of a block that rewrites a weight's layout (weight packing):
# TVM's SplitLayoutRewritePreproc splits such blocks out of a kernel, so the build runs
# them once, on the weights, and the tuner times kernels without them.
LAYOUT_REWRITE = "meta_schedule.layout_rewrite_preproc"


def config_json_key(config_json) -> str:
    """A configuration's key in tuning logs: its JSON, keys sorted."""
    import json

    return json.dumps(config_json, sort_keys=True)


class ConfigRule:
    """Base class: subclasses define ``name``, ``match``, ``configs`` and ``schedule``;
    ``config_type`` is the (dataclass) type of their configurations, None when a rule
    has only one."""

    name = "rule"
    # Earlier names of the rule: tuning logs and manifests that name it so still apply.
    aliases: tuple[str, ...] = ()
    config_type = None
    # Whether the tuner also searches MetaSchedule's own space for the kernels this rule
    # schedules (False: our configurations are the whole space).
    metaschedule_space = True

    def config_to_json(self, config) -> dict | None:
        """The configuration as JSON, without the fields its type lists in
        ``OMITTED_AT_DEFAULT`` where they hold their default: fields added after tuning
        logs were written, so that what those logs timed keeps its key."""
        from dataclasses import asdict, fields

        if config is None:
            return None
        data = asdict(config)
        omitted = getattr(type(config), "OMITTED_AT_DEFAULT", ())
        for f in fields(config):
            if f.name in omitted and data[f.name] == f.default:
                del data[f.name]
        return data

    def default_config_key(self, func, target) -> str | None:
        """The JSON key (``config_json_key``) of the configuration ``apply`` uses for
        ``func``, or None where the rule does not match or has no configurations."""
        configs = self.all_configs(func, target)
        return config_json_key(self.config_to_json(configs[0])) if configs else None

    def config_from_json(self, data: dict | None):
        return self.config_type(**data) if self.config_type and data is not None else None

    def apply_config(self, func, target, config):
        """``func`` scheduled with ``config``, or None (no match, or it does not apply)."""
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        found = self.match(sch, target)
        if found is None:
            return None
        try:
            self.schedule(sch, found, config, target)
        except s_tir.ScheduleError:
            return None
        return sch

    def match(self, sch, target):
        """What ``schedule`` needs to know about ``sch``'s function, or None."""
        raise NotImplementedError

    def configs(self, found, target) -> list:
        """Configurations that fit ``found`` on ``target``; the default first."""
        raise NotImplementedError

    def schedule(self, sch, found, config, target) -> None:
        """Schedule ``sch`` in place; raises ``ScheduleError`` when it cannot."""
        raise NotImplementedError

    def searchable(self, found, config, target) -> bool:
        """Whether MetaSchedule can measure ``config``'s schedule (see ``space``)."""
        return True

    def all_configs(self, func, target) -> list:
        """``configs`` for ``func`` (empty when the rule does not match)."""
        from tvm import s_tir

        found = self.match(s_tir.Schedule(func), target)
        return [] if found is None else self.configs(found, target)

    def apply(self, func, target, _tunable=False):
        """The default configuration's schedule of ``func``, or None."""
        configs = self.all_configs(func, target)
        return self.apply_config(func, target, configs[0]) if configs else None

    def space(self, sch, target) -> list:
        """A schedule per searchable configuration, each a copy of ``sch`` (its trace
        extended), in ``configs`` order; empty when the rule does not match."""
        from tvm import s_tir

        found = self.match(sch.copy(), target)
        if found is None:
            return []
        out = []
        for config in self.configs(found, target):
            if not self.searchable(found, config, target):
                continue
            copy = sch.copy()
            try:
                self.schedule(copy, self.match(copy, target), config, target)
            except s_tir.ScheduleError as e:
                log.debug("%s: config %s does not apply (%s)", self.name, config,
                          first_line(e))
                continue
            out.append(copy)
        return out
