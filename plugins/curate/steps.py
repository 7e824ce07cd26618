"""The built-in curation steps, in the order a pipeline usually runs them."""

from __future__ import annotations

from llmforge_plugins.curate.decontam import Decontaminate
from llmforge_plugins.curate.dedup import ExactDedup, NearDedup
from llmforge_plugins.curate.language import LanguageFilter
from llmforge_plugins.curate.lint import LintStep
from llmforge_plugins.curate.normalize import Normalize
from llmforge_plugins.curate.pii import PiiScrub
from llmforge_plugins.curate.quality import QualityFilter

BUILTIN = (Normalize, PiiScrub, ExactDedup, NearDedup, QualityFilter, LanguageFilter, Decontaminate, LintStep)
