"""Great Expectations suites and gates for the data stages' manifests.

Importing this package is cheap: great_expectations itself is imported on first use.
"""

from vidops.quality.suites import SUITE_STAGES, build_suite, suite_name
from vidops.quality.validate import ValidationReport, validate_manifest

__all__ = ["SUITE_STAGES", "ValidationReport", "build_suite", "suite_name", "validate_manifest"]
