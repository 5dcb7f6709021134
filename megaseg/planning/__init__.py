"""Memory planning: per-rank bytes of a run's models (megaseg.planning.memory), `megaseg plan`
(megaseg.planning.plan), and measured peaks to validate them against (megaseg.planning.measure)."""
