//! `centralflow graph`: a pipeline's DAG as Mermaid (renders in GitHub, GitLab and most editors'
//! Markdown previews) or Graphviz DOT, each component labelled with its name and type, each edge
//! from a secondary output labelled with the port (`late`, `dead_letter`).

use std::fmt::Write as _;

use crate::config::Plan;
use crate::runtime::Role;

/// A diagram format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Mermaid,
    Dot,
}

/// The plan's DAG in `format`.
pub fn render(plan: &Plan, format: Format) -> String {
    match format {
        Format::Mermaid => mermaid(plan),
        Format::Dot => dot(plan),
    }
}

/// The port an edge leaves from, when it is not the main output.
fn port_label(plan: &Plan, up: usize, port: usize) -> Option<&'static str> {
    plan.nodes[up].ports.get(port).copied().filter(|p| !p.is_empty())
}

/// Mermaid flowchart, left to right: sources as stadiums, transforms as boxes, sinks as
/// cylinders. Node ids are `n0`, `n1`, ... so that any component name is safe; names are labels.
pub fn mermaid(plan: &Plan) -> String {
    let mut out = String::from("flowchart LR\n");
    for (i, n) in plan.nodes.iter().enumerate() {
        let label = format!("{}<br/><i>{}</i>", mermaid_text(&n.name), mermaid_text(n.kind));
        let _ = match n.role {
            Role::Source => writeln!(out, "  n{i}([\"{label}\"])"),
            Role::Transform => writeln!(out, "  n{i}[\"{label}\"]"),
            Role::Sink => writeln!(out, "  n{i}[(\"{label}\")]"),
        };
    }
    for (i, n) in plan.nodes.iter().enumerate() {
        for &(up, port) in &n.inputs {
            let _ = match port_label(plan, up, port) {
                Some(p) => writeln!(out, "  n{up} -.->|{p}| n{i}"),
                None => writeln!(out, "  n{up} --> n{i}"),
            };
        }
    }
    out
}

/// Text inside a quoted Mermaid label: quotes and markup characters as entities.
fn mermaid_text(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '"' => "#quot;".to_string(),
            '<' => "#lt;".to_string(),
            '>' => "#gt;".to_string(),
            '#' => "#35;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// Graphviz DOT, left to right, with the same shapes as [`mermaid`].
pub fn dot(plan: &Plan) -> String {
    let mut out = format!("digraph {} {{\n  rankdir=LR;\n  node [fontname=\"sans-serif\"];\n", dot_id(&plan.name));
    for (i, n) in plan.nodes.iter().enumerate() {
        let shape = match n.role {
            Role::Source => "shape=box, style=rounded",
            Role::Transform => "shape=box",
            Role::Sink => "shape=cylinder",
        };
        let _ = writeln!(out, "  n{i} [label={}, {shape}];", dot_id(&format!("{}\n{}", n.name, n.kind)));
    }
    for (i, n) in plan.nodes.iter().enumerate() {
        for &(up, port) in &n.inputs {
            let _ = match port_label(plan, up, port) {
                Some(p) => writeln!(out, "  n{up} -> n{i} [label={}, style=dashed];", dot_id(p)),
                None => writeln!(out, "  n{up} -> n{i};"),
            };
        }
    }
    out.push_str("}\n");
    out
}

/// A quoted DOT id.
fn dot_id(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        let yaml = "name: 'my \"pipe\"'\nsources:\n  export: {type: simulator, count: 10}\ntransforms:\n  w:\n    type: window\n    inputs: [export]\n    window: {kind: tumbling, size: 1m}\n    aggregates: {temperature: [avg]}\nsinks:\n  lake: {type: jsonl, inputs: [w], path: out.jsonl}\n  late: {type: jsonl, inputs: [w.late], path: late.jsonl}\n";
        crate::config::load_str(yaml, "p", &|_| None).expect("valid")
    }

    #[test]
    fn mermaid_names_every_component_and_labels_secondary_ports() {
        let m = mermaid(&plan());
        assert!(m.starts_with("flowchart LR\n"), "{m}");
        assert!(m.contains("([\"export<br/><i>simulator</i>\"])"), "{m}");
        assert!(m.contains("[\"w<br/><i>window</i>\"]"), "{m}");
        assert_eq!(mermaid_text("a\"<b>#"), "a#quot;#lt;b#gt;#35;");
        assert!(m.contains("[(\"lake<br/><i>jsonl</i>\")]"), "{m}");
        let edges: Vec<&str> = m.lines().filter(|l| l.contains("->")).collect();
        assert_eq!(edges.len(), 3, "{m}");
        assert_eq!(edges.iter().filter(|l| l.contains("-.->|late|")).count(), 1, "{m}");
    }

    #[test]
    fn dot_escapes_names_and_labels_secondary_ports() {
        let d = dot(&plan());
        assert!(d.starts_with("digraph \"my \\\"pipe\\\"\" {"), "a quote in the name is escaped: {d}");
        assert!(d.contains("n1 [label=\"w\\nwindow\", shape=box];"), "{d}");
        assert_eq!(d.matches(" -> ").count(), 3, "{d}");
        assert!(d.contains("[label=\"late\", style=dashed]"), "{d}");
    }
}
