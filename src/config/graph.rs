//! Passes 2 and 3 of validation: each component's own checks, then the graph (inputs and
//! ports resolved, cycles, unread outputs), ordered, with each source's projection and which
//! transforms keep state per partition.

use super::*;

/// Passes 2 and 3: component checks and the graph.
pub(super) fn semantic(
    config: PipelineConfig,
    value: &serde_json::Value,
    default_name: &str,
    invalid: &std::collections::BTreeSet<String>,
    cx: &mut Checker<'_>,
) -> Option<Plan> {
    let name = config.name.clone().unwrap_or_else(|| default_name.to_string());
    let declared = |sec: &str| value.get(sec).and_then(|v| v.as_object()).map_or(0, |o| o.len());
    if declared("sources") == 0 {
        cx.error("/sources", "a pipeline needs at least one source");
    }
    if declared("sinks") == 0 {
        cx.error("/sinks", "a pipeline needs at least one sink");
    }
    check_settings(&config, cx);
    let mut nodes = plan_nodes(&config, value, cx);
    resolve_edges(&mut nodes, invalid, cx);
    if let Some(cycle) = find_cycle(&nodes) {
        let first = &nodes[cycle[0]];
        let path: Vec<&str> = cycle.iter().map(|&i| nodes[i].name.as_str()).collect();
        cx.error(
            &format!("/{}/{}/inputs", first.role.section(), yaml::pointer_escape(&first.name)),
            format!("the inputs form a cycle: {} -> {}", path.join(" -> "), path[0]),
        );
    }
    // components whose output nobody reads (warning: probably a mistake)
    for (i, n) in nodes.iter().enumerate() {
        if n.role != Role::Sink && !nodes.iter().any(|m| m.inputs.iter().any(|(u, p)| *u == i && *p == 0)) {
            cx.warn(
                &format!("/{}/{}", n.role.section(), yaml::pointer_escape(&n.name)),
                "its output is not read by any component",
            );
        }
    }
    if !cx.errors.is_empty() {
        return None;
    }
    let nodes = finish(nodes, cx);
    Some(Plan { name, nodes, checkpoint: config.checkpoint, api: config.api, warnings: Vec::new() })
}

/// The pipeline-wide settings: checkpoint and operations endpoint.
fn check_settings(config: &PipelineConfig, cx: &mut Checker<'_>) {
    if let Some(c) = &config.checkpoint {
        if let Some(u) = &c.url {
            cx.url("/checkpoint/url", u);
        }
        cx.positive_duration("/checkpoint/interval", &c.interval);
        cx.storage_options("/checkpoint/storage", &c.storage);
    }
    if let Some(a) = &config.api {
        if a.address.parse::<std::net::SocketAddr>().is_err() {
            cx.error("/api/address", format!("{:?} is not an address like 127.0.0.1:8686", a.address));
        }
    }
}

/// One node per component, each checked by its own [`Spec`]; names unique across sections.
fn plan_nodes(config: &PipelineConfig, value: &serde_json::Value, cx: &mut Checker<'_>) -> Vec<PlanNode> {
    fn node<C: Spec + fmt::Debug>(
        role: Role,
        name: &str,
        c: &C,
        kind: &'static str,
        value: &serde_json::Value,
        wrap: ComponentConfig,
        cx: &mut Checker<'_>,
    ) -> PlanNode {
        let ptr = format!("/{}/{}", role.section(), yaml::pointer_escape(name));
        c.check(&ptr, cx);
        let ports = if role == Role::Sink { Vec::new() } else { c.ports() };
        if let (false, Err(e)) = (role == Role::Sink, crate::runtime::Port::check_declared(&ports)) {
            cx.error(&ptr, format!("the `{kind}` component {e} (a bug in centralflow)"));
        }
        PlanNode {
            name: name.to_string(),
            role,
            kind,
            inputs: vec![],
            ports: ports.iter().map(|p| p.name).collect(),
            hands_over: c.hands_over_partitions(),
            accepts_columns: c.accepts_columns(),
            fingerprint: crate::runtime::checkpoint::fingerprint(&value[role.section()][name]),
            config: wrap,
            projection: None,
            partitioned: false,
        }
    }
    let mut nodes = Vec::new();
    for (n, c) in &config.sources {
        nodes.push(node(Role::Source, n, c, c.kind(), value, ComponentConfig::Source(c.clone()), cx));
    }
    for (n, c) in &config.transforms {
        nodes.push(node(Role::Transform, n, c, c.kind(), value, ComponentConfig::Transform(c.clone()), cx));
    }
    for (n, c) in &config.sinks {
        nodes.push(node(Role::Sink, n, c, c.kind(), value, ComponentConfig::Sink(c.clone()), cx));
    }
    let mut seen: BTreeMap<String, Role> = BTreeMap::new();
    for node in &nodes {
        if let Some(prev) = seen.insert(node.name.clone(), node.role) {
            cx.error(
                &format!("/{}/{}", node.role.section(), yaml::pointer_escape(&node.name)),
                format!(
                    "the name `{}` is also used in `{}`: component names must be unique",
                    node.name,
                    prev.section()
                ),
            );
        }
    }
    nodes
}

/// Resolves every `inputs:` entry (`name` or `name.port`) to (node index, port index).
fn resolve_edges(nodes: &mut [PlanNode], invalid: &std::collections::BTreeSet<String>, cx: &mut Checker<'_>) {
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).chain(invalid.iter().cloned()).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    for i in 0..nodes.len() {
        let inputs = match &nodes[i].config {
            ComponentConfig::Source(_) => continue,
            ComponentConfig::Transform(t) => t.inputs().to_vec(),
            ComponentConfig::Sink(s) => s.inputs().to_vec(),
        };
        let base = format!("/{}/{}/inputs", nodes[i].role.section(), yaml::pointer_escape(&nodes[i].name));
        if inputs.is_empty() {
            cx.error(&base, "needs at least one input");
        }
        let mut resolved = Vec::new();
        for (k, input) in inputs.iter().enumerate() {
            let ptr = format!("{base}/{k}");
            let (comp, port) = input.split_once('.').unwrap_or((input.as_str(), ""));
            if invalid.contains(comp) {
                continue; // already reported
            }
            let Some(up) = nodes.iter().position(|n| n.name == comp) else {
                cx.error(&ptr, format!("unknown input `{comp}`{}", suggest(comp, &name_refs)));
                continue;
            };
            if nodes[up].role == Role::Sink {
                cx.error(&ptr, format!("`{comp}` is a sink and has no output"));
                continue;
            }
            let Some(p) = nodes[up].ports.iter().position(|x| *x == port) else {
                let named: String =
                    nodes[up].ports.iter().filter(|p| !p.is_empty()).map(|p| format!(", `{comp}.{p}`")).collect();
                cx.error(&ptr, format!("`{comp}` has no output `{port}` (its outputs: `{comp}`{named})"));
                continue;
            };
            if up == i {
                cx.error(&ptr, "a component cannot read its own output");
                continue;
            }
            resolved.push((up, p));
        }
        nodes[i].inputs = resolved;
    }
}

/// Orders the nodes so that each comes after its inputs, and derives what follows from the
/// graph: each source's projection, and which transforms keep state per partition.
fn finish(nodes: Vec<PlanNode>, cx: &mut Checker<'_>) -> Vec<PlanNode> {
    let order = topo_order(&nodes);
    let mut remap = vec![0; nodes.len()];
    for (new, &old) in order.iter().enumerate() {
        remap[old] = new;
    }
    let mut ordered: Vec<PlanNode> = order.iter().map(|&i| nodes[i].clone()).collect();
    for n in &mut ordered {
        for inp in &mut n.inputs {
            inp.0 = remap[inp.0];
        }
    }
    for i in 0..ordered.len() {
        if ordered[i].role == Role::Source {
            ordered[i].projection = projection_for(&ordered, i).map(std::sync::Arc::new);
        }
        // nodes come after their inputs: one pass propagates "fed by a source whose partitions move"
        let fed = ordered[i].inputs.iter().any(|(u, _)| ordered[*u].partitioned || ordered[*u].hands_over);
        ordered[i].partitioned = ordered[i].role != Role::Source && fed;
        if let (true, ComponentConfig::Transform(t)) = (ordered[i].partitioned, &ordered[i].config) {
            t.check_partitioned(&format!("/transforms/{}", yaml::pointer_escape(&ordered[i].name)), cx);
        }
    }
    ordered
}

/// The fields the pipeline reads of the events of source `src` (see
/// [`crate::projection::for_source`]). `None` when some component needs everything.
pub fn projection_for(nodes: &[PlanNode], src: usize) -> Option<crate::projection::Projection> {
    let readers: Vec<crate::projection::Reader> = nodes
        .iter()
        .map(|n| {
            let (needs, forwards) = match &n.config {
                ComponentConfig::Transform(t) => (t.needs(), t.forwards()),
                ComponentConfig::Sink(s) => (s.needs(), false),
                ComponentConfig::Source(_) => (Needs::Fields(Vec::new()), false),
            };
            let reads = match needs {
                Needs::All => None,
                Needs::Fields(paths) => Some(paths.iter().map(|p| (p.parts().to_vec(), p.is_export_key())).collect()),
            };
            crate::projection::Reader { inputs: n.inputs.clone(), reads, forwards }
        })
        .collect();
    crate::projection::for_source(&readers, src)
}

fn find_cycle(nodes: &[PlanNode]) -> Option<Vec<usize>> {
    // colours: 0 new, 1 on stack, 2 done
    fn visit(i: usize, nodes: &[PlanNode], colour: &mut [u8], stack: &mut Vec<usize>) -> Option<Vec<usize>> {
        colour[i] = 1;
        stack.push(i);
        for &(up, _) in &nodes[i].inputs {
            if colour[up] == 1 {
                let at = stack.iter().position(|&s| s == up).unwrap();
                let mut cyc: Vec<usize> = stack[at..].to_vec();
                cyc.reverse();
                return Some(cyc);
            }
            if colour[up] == 0 {
                if let Some(c) = visit(up, nodes, colour, stack) {
                    return Some(c);
                }
            }
        }
        stack.pop();
        colour[i] = 2;
        None
    }
    let mut colour = vec![0u8; nodes.len()];
    for i in 0..nodes.len() {
        if colour[i] == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(i, nodes, &mut colour, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

fn topo_order(nodes: &[PlanNode]) -> Vec<usize> {
    let mut done = vec![false; nodes.len()];
    let mut order = Vec::with_capacity(nodes.len());
    fn visit(i: usize, nodes: &[PlanNode], done: &mut [bool], order: &mut Vec<usize>) {
        if done[i] {
            return;
        }
        done[i] = true;
        for &(up, _) in &nodes[i].inputs {
            visit(up, nodes, done, order);
        }
        order.push(i);
    }
    for i in 0..nodes.len() {
        visit(i, nodes, &mut done, &mut order);
    }
    order
}
