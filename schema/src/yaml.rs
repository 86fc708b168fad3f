//! A YAML document as a tree of nodes that remember where they came from (file line and
//! column, or the `--set` override that produced them), so recipe errors can name the line.

use saphyr_parser::{Event, Parser, ScalarStyle, Span};
use std::collections::HashMap;
use std::fmt;

/// Where a node came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loc {
    /// 1-based line and column in the recipe file.
    File { line: usize, col: usize },
    /// A `--set key=value` override from the command line.
    Override(String),
    /// Not written anywhere: the default.
    Default,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Loc::File { line, col } => write!(f, "line {line}, column {col}"),
            Loc::Override(s) => write!(f, "--set {s}"),
            Loc::Default => write!(f, "default"),
        }
    }
}

#[derive(Debug, Clone)]
pub enum NodeKind {
    Null,
    /// A scalar's text and whether it was quoted (quoted scalars are always strings).
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    /// Keys in document order, with the location of each key.
    Map(Vec<(String, Loc, Node)>),
}

#[derive(Debug, Clone)]
pub struct Node {
    pub kind: NodeKind,
    pub loc: Loc,
}

impl Node {
    pub fn null(loc: Loc) -> Self {
        Node {
            kind: NodeKind::Null,
            loc,
        }
    }
    pub fn empty_map(loc: Loc) -> Self {
        Node {
            kind: NodeKind::Map(Vec::new()),
            loc,
        }
    }
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            NodeKind::Null => "null",
            NodeKind::Scalar { quoted: true, .. } => "a quoted string",
            NodeKind::Scalar { .. } => "a scalar",
            NodeKind::Seq(_) => "a list",
            NodeKind::Map(_) => "a mapping",
        }
    }
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.kind {
            NodeKind::Map(entries) => entries.iter().find(|(k, _, _)| k == key).map(|(_, _, v)| v),
            _ => None,
        }
    }

    /// Sets `path` (dot-separated) to `value`, creating intermediate mappings.
    pub fn set_path(&mut self, path: &[&str], value: Node) -> Result<(), String> {
        let Some((first, rest)) = path.split_first() else {
            *self = value;
            return Ok(());
        };
        if matches!(self.kind, NodeKind::Null) {
            self.kind = NodeKind::Map(Vec::new());
        }
        match &mut self.kind {
            NodeKind::Map(entries) => {
                if let Some((_, _, child)) = entries.iter_mut().find(|(k, _, _)| k == first) {
                    child.set_path(rest, value)
                } else {
                    let mut child = Node::null(value.loc.clone());
                    child.set_path(rest, value.clone())?;
                    entries.push((first.to_string(), value.loc, child));
                    Ok(())
                }
            }
            _ => Err(format!(
                "'{first}' cannot be set: its parent is {}, not a mapping",
                self.type_name()
            )),
        }
    }
}

/// A YAML syntax error with its position.
#[derive(Debug, Clone)]
pub struct YamlError {
    pub line: usize,
    pub col: usize,
    pub msg: String,
}

fn loc_of(span: &Span, base: &Option<String>) -> Loc {
    match base {
        Some(s) => Loc::Override(s.clone()),
        None => Loc::File {
            line: span.start.line(),
            col: span.start.col() + 1,
        },
    }
}

enum Frame {
    Seq(Vec<Node>, Loc, usize),
    Map(Vec<(String, Loc, Node)>, Loc, Option<(String, Loc)>, usize),
}

/// Parses one YAML document. `origin` = `Some(text)` marks every node as coming from a
/// `--set` override instead of a file line.
pub fn parse(text: &str, origin: Option<String>) -> Result<Node, YamlError> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    let mut root: Option<Node> = None;
    let mut docs = 0;
    for item in Parser::new_from_str(text) {
        let (event, span) = item.map_err(|e| YamlError {
            line: e.marker().line(),
            col: e.marker().col() + 1,
            msg: e.info().to_string(),
        })?;
        let loc = loc_of(&span, &origin);
        let err = |msg: String| YamlError {
            line: span.start.line(),
            col: span.start.col() + 1,
            msg,
        };
        let finished: Option<(Node, usize)> = match event {
            Event::StreamStart | Event::StreamEnd | Event::Nothing | Event::DocumentEnd => None,
            Event::DocumentStart(_) => {
                docs += 1;
                if docs > 1 {
                    return Err(err("a recipe is one YAML document; found a second one (---)".into()));
                }
                None
            }
            Event::Scalar(value, style, anchor, _tag) => {
                let quoted = !matches!(style, ScalarStyle::Plain);
                let kind = if !quoted && matches!(value.as_ref(), "" | "~" | "null" | "Null" | "NULL") {
                    NodeKind::Null
                } else {
                    NodeKind::Scalar {
                        text: value.to_string(),
                        quoted,
                    }
                };
                Some((Node { kind, loc }, anchor))
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some(n) => Some((n.clone(), 0)),
                None => return Err(err("alias to an unknown anchor".into())),
            },
            Event::SequenceStart(anchor, _) => {
                stack.push(Frame::Seq(Vec::new(), loc, anchor));
                None
            }
            Event::MappingStart(anchor, _) => {
                stack.push(Frame::Map(Vec::new(), loc, None, anchor));
                None
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq(items, l, anchor)) => Some((
                    Node {
                        kind: NodeKind::Seq(items),
                        loc: l,
                    },
                    anchor,
                )),
                _ => return Err(err("unbalanced sequence".into())),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map(entries, l, _, anchor)) => Some((
                    Node {
                        kind: NodeKind::Map(entries),
                        loc: l,
                    },
                    anchor,
                )),
                _ => return Err(err("unbalanced mapping".into())),
            },
        };
        if let Some((node, anchor)) = finished {
            if anchor != 0 {
                anchors.insert(anchor, node.clone());
            }
            match stack.last_mut() {
                None => root = Some(node),
                Some(Frame::Seq(items, _, _)) => items.push(node),
                Some(Frame::Map(entries, _, pending, _)) => match pending.take() {
                    None => {
                        let key = match &node.kind {
                            NodeKind::Scalar { text, .. } => text.clone(),
                            NodeKind::Null => "null".into(),
                            _ => return Err(err("mapping keys must be plain strings".into())),
                        };
                        if entries.iter().any(|(k, _, _)| *k == key) {
                            return Err(err(format!("duplicate key '{key}'")));
                        }
                        *pending = Some((key, node.loc));
                    }
                    Some((key, kloc)) => entries.push((key, kloc, node)),
                },
            }
        }
    }
    Ok(root.unwrap_or(Node::null(Loc::File { line: 1, col: 1 })))
}
