//! From a validated [`Plan`] to a running pipeline: opens the run's [`Session`] (checkpoint
//! store, restored state), builds every component through its registry
//! ([`crate::sources::build`], [`crate::transforms::build`], [`crate::sinks::build`]), and hands
//! the wired [`Graph`] to the runtime, which knows components only by their traits.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;

use crate::config::{ComponentConfig, Plan};
use crate::metrics::ComponentMetrics;
use crate::runtime::checkpoint::CheckpointStore;
use crate::runtime::{self, BuildCx, Component, Graph, Node, RunOptions, RunSummary, Session};

/// Runs a plan until its sources are exhausted or `stop` resolves, then writes the final
/// checkpoint, commits, and returns.
pub async fn run_pipeline(
    plan: &Plan,
    opts: RunOptions,
    stop: impl Future<Output = ()> + Send,
) -> anyhow::Result<RunSummary> {
    let session = open_session(plan, opts.reset_state).await?;
    let graph = build(plan, &session, &opts).await?;
    runtime::run(graph, session, opts, stop).await
}

/// Opens the plan's checkpoint store (if it has one) and what it restores.
pub async fn open_session(plan: &Plan, reset: bool) -> anyhow::Result<Session> {
    let store = match plan.checkpoint.as_ref().and_then(|c| c.url.as_ref().map(|u| (u, c))) {
        Some((url, c)) => {
            let loc =
                crate::storage::open(url, &c.storage).with_context(|| format!("opening the checkpoint store {url}"))?;
            Some(CheckpointStore::new(loc, &plan.name))
        }
        None => None,
    };
    let interval = match &plan.checkpoint {
        Some(c) => c.interval()?,
        None => Duration::from_secs(10),
    };
    Session::open(&plan.name, store, interval, reset).await
}

/// Builds every component of the plan with its restored state.
pub async fn build(plan: &Plan, session: &Session, opts: &RunOptions) -> anyhow::Result<Graph> {
    let columnar = columnar_ports(plan);
    let mut nodes = Vec::with_capacity(plan.nodes.len());
    for (node, columnar) in plan.nodes.iter().zip(columnar) {
        let metrics = ComponentMetrics::new(&node.name, node.kind);
        let restored = session.restored(&node.name, node.fingerprint);
        let bcx = BuildCx {
            pipeline: &plan.name,
            name: &node.name,
            mode: opts.mode,
            restored: restored.state.clone(),
            state: session.store.clone(),
            instance: &session.instance,
            metrics: metrics.clone(),
            projection: node.projection.clone(),
            partitioned: node.partitioned,
            first_epoch: session.base_epoch + 1,
        };
        let component = match &node.config {
            ComponentConfig::Source(cfg) => Component::Source(
                crate::sources::build(cfg, &bcx).await.with_context(|| format!("source {}", node.name))?,
            ),
            ComponentConfig::Transform(cfg) => Component::Transform(
                crate::transforms::build(cfg, &bcx).with_context(|| format!("transform {}", node.name))?,
            ),
            ComponentConfig::Sink(cfg) => Component::Sink(
                crate::sinks::build(cfg, &bcx).await.with_context(|| format!("sink {}", node.name))?,
                node.accepts_columns,
            ),
        };
        nodes.push(Node {
            name: node.name.clone(),
            kind: node.kind,
            fingerprint: node.fingerprint,
            inputs: node.inputs.clone(),
            ports: node.ports.clone(),
            columnar,
            component,
            restored,
            metrics,
        });
    }
    Ok(Graph { nodes })
}

/// Per node and output port: whether every consumer of the port reads rows as Arrow columns
/// ([`crate::config::Spec::accepts_columns`]), so that a transform may emit them so.
pub fn columnar_ports(plan: &Plan) -> Vec<Vec<bool>> {
    plan.nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            (0..node.ports.len().max(1))
                .map(|p| {
                    let mut consumers = plan.nodes.iter().filter(|n| n.inputs.contains(&(i, p))).peekable();
                    consumers.peek().is_some() && consumers.all(|n| n.accepts_columns)
                })
                .collect()
        })
        .collect()
}
