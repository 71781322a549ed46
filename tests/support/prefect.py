"""What the Prefect server recorded of a flow run's subflows: their task runs and final states."""

from __future__ import annotations


def subflow_task_runs(parent_flow_run_id, subflow: str, prefix: str) -> dict[str, str]:
    """{task run name: final state} of the task runs named `prefix...` in the one run of the subflow
    named `subflow` under a flow run."""
    runs = subflow_runs_task_states(parent_flow_run_id, subflow, prefix)
    assert len(runs) == 1, f"{len(runs)} runs of {subflow}"
    return runs[0]


def subflow_runs_task_states(parent_flow_run_id, subflow: str, prefix: str) -> list[dict[str, str]]:
    """For each run of the subflow named `subflow` under a flow run (a retried flow run has one per
    attempt), oldest first: {task run name: final state} of its task runs named `prefix...`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        parent = FlowRunFilterParentFlowRunId(any_=[parent_flow_run_id])
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=parent))
        runs = sorted(
            (r for r in runs if client.read_flow(r.flow_id).name == subflow), key=lambda r: r.created
        )
        states = []
        for run in runs:
            tasks = client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run.id]))
            )
            states.append({t.name: t.state.type.value for t in tasks if t.name.startswith(prefix)})
    return states
