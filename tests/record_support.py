"""Records shared by the index tests."""

from __future__ import annotations

from telemetry.models import SCHEMA_VERSION, RunRecord


def make_full_record(run_id: str) -> RunRecord:
    """Return a run with every field set, unicode text and nested metrics."""
    return RunRecord(
        run_id=run_id,
        agent_name="agent-ü",
        job_type="crawl",
        start_time="2026-03-01T10:00:00.123456+00:00",
        trigger_type="schedule",
        parent_run_id="parent-1",
        status="failed",
        end_time="2026-03-01T10:00:05.654321+00:00",
        duration_ms=5531,
        error_summary="ValueError: naïve 😀",
        error_details="Traceback (most recent call last):\n  ...\nValueError: naïve",
        items_discovered=10,
        items_succeeded=7,
        items_failed=3,
        input_summary="10 URLs",
        output_summary="7 pages, 日本語",
        metrics_json={"tokens": {"in": 1200, "out": [1, 2.5, None, True]}, "model": "m-1"},
        insight_id="ins-9",
        product="product-x",
        platform="linux",
        product_family="family",
        subdomain="docs",
        git_repo="https://example.invalid/repo.git",
        git_branch="main",
        git_commit="0123456789abcdef",
        git_run_tag="v1.2.3",
        agent_version="1.2.3",
        hostname="host-1",
        pid=4321,
        api_posted=True,
        api_posted_at="2026-03-01T10:00:06.000000+00:00",
        api_retry_count=2,
        api_last_error="HTTP 503",
        created_at="2026-03-01T10:00:00.200000+00:00",
        updated_at="2026-03-01T10:00:06.000000+00:00",
        schema_version=SCHEMA_VERSION,
    )
