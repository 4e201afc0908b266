"""IMA measurement lists: parse, replay, appraise against runtime policies."""
