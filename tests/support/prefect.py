"""What the Prefect server recorded of a flow run's subflow: its task runs and their final states."""

from __future__ import annotations


def subflow_task_runs(parent_flow_run_id, subflow: str, prefix: str) -> dict[str, str]:
    """{task run name: final state} of the task runs named `prefix...` in the one subflow (named
    `subflow`) of a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        parent = FlowRunFilterParentFlowRunId(any_=[parent_flow_run_id])
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=parent))
        assert [client.read_flow(r.flow_id).name for r in subflows] == [subflow]
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[subflows[0].id]))
        )
    return {r.name: r.state.type.value for r in runs if r.name.startswith(prefix)}
