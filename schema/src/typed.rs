//! Typed reading of a YAML node tree: every problem is collected (with the key path and the
//! line it came from) instead of stopping at the first one.

use crate::yaml::{Loc, Node, NodeKind};
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

/// One problem in a recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Dotted key path, e.g. `train.lr`.
    pub path: String,
    pub loc: Loc,
    pub msg: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}",
            if self.path.is_empty() {
                "(top level)"
            } else {
                &self.path
            },
            self.msg
        )
    }
}

/// Collects issues and remembers where every key was written.
#[derive(Debug, Default)]
pub struct Ctx {
    pub issues: Vec<Issue>,
    pub locs: HashMap<String, Loc>,
}

impl Ctx {
    pub fn issue(&mut self, path: &str, loc: &Loc, msg: impl Into<String>) {
        self.issues.push(Issue {
            path: path.to_string(),
            loc: loc.clone(),
            msg: msg.into(),
        });
    }
    /// Reports an issue at the location where `path` was written (or "default").
    pub fn issue_at(&mut self, path: &str, msg: impl Into<String>) {
        let loc = self.locs.get(path).cloned().unwrap_or(Loc::Default);
        self.issue(path, &loc, msg);
    }
    /// Whether `path` was written in the recipe or an override (vs. left at its default).
    pub fn is_set(&self, path: &str) -> bool {
        self.locs.contains_key(path)
    }
}

/// Checks shared by recipe sections, each reported at `path` (where it was written).
impl Ctx {
    /// At least 1.
    pub fn positive(&mut self, path: &str, v: i64) {
        if v < 1 {
            self.issue_at(path, format!("must be at least 1, got {v}"));
        }
    }
    /// At least 1 when set.
    pub fn positive_if_set(&mut self, path: &str, v: Option<i64>) {
        if let Some(v) = v {
            self.positive(path, v);
        }
    }
    /// In (0, 1].
    pub fn fraction(&mut self, path: &str, v: f64) {
        if !(v > 0.0 && v <= 1.0) {
            self.issue_at(path, format!("must be in (0, 1], got {v}"));
        }
    }
    /// At least 0.
    pub fn non_negative(&mut self, path: &str, v: f64) {
        if v < 0.0 {
            self.issue_at(path, format!("must be >= 0, got {v}"));
        }
    }
    /// Finite and above 0.
    pub fn above_zero(&mut self, path: &str, v: f64) {
        if !(v.is_finite() && v > 0.0) {
            self.issue_at(path, format!("must be > 0, got {v}"));
        }
    }
}

/// The documented keys of a section ([`section!`]), for the recipe reference.
pub trait SectionDocs {
    /// (key, documentation) of every field, in declaration order.
    fn field_docs() -> Vec<(&'static str, String)>;
}

pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Reads a value of this type from a node, reporting problems into `cx`.
pub trait FromNode: Sized {
    /// What the value looks like, for messages ("an integer", "a mapping", ...).
    const EXPECTED: &'static str;
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self>;
}

/// How a node reads in a message ("the string \"x\"", "'x'", "a list").
pub fn describe(node: &Node) -> String {
    match &node.kind {
        NodeKind::Scalar { text, quoted: true } => format!("the string \"{text}\""),
        NodeKind::Scalar { text, .. } => format!("'{text}'"),
        _ => node.type_name().to_string(),
    }
}

pub fn type_issue<T: FromNode>(node: &Node, path: &str, cx: &mut Ctx) {
    cx.issue(
        path,
        &node.loc,
        format!("expected {}, got {}", T::EXPECTED, describe(node)),
    );
}

fn plain(node: &Node) -> Option<&str> {
    match &node.kind {
        NodeKind::Scalar { text, quoted: false } => Some(text.as_str()),
        _ => None,
    }
}

macro_rules! int_from_node {
    ($($t:ty),*) => {$(
        impl FromNode for $t {
            const EXPECTED: &'static str = if <$t>::MIN == 0 { "a non-negative integer" } else { "an integer" };
            fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
                match plain(node).and_then(|s| s.replace('_', "").parse::<$t>().ok()) {
                    Some(v) => Some(v),
                    None => { type_issue::<Self>(node, path, cx); None }
                }
            }
        }
    )*};
}
int_from_node!(u32, u64, usize, i64);

impl FromNode for f64 {
    const EXPECTED: &'static str = "a number";
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        match plain(node)
            .and_then(|s| s.replace('_', "").parse::<f64>().ok())
            .filter(|v| v.is_finite())
        {
            Some(v) => Some(v),
            None => {
                type_issue::<Self>(node, path, cx);
                None
            }
        }
    }
}

impl FromNode for bool {
    const EXPECTED: &'static str = "true or false";
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        match plain(node) {
            Some("true" | "True" | "TRUE") => Some(true),
            Some("false" | "False" | "FALSE") => Some(false),
            _ => {
                type_issue::<Self>(node, path, cx);
                None
            }
        }
    }
}

impl FromNode for String {
    const EXPECTED: &'static str = "a string";
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        match &node.kind {
            NodeKind::Scalar { text, .. } => Some(text.clone()),
            _ => {
                type_issue::<Self>(node, path, cx);
                None
            }
        }
    }
}

impl FromNode for PathBuf {
    const EXPECTED: &'static str = "a path";
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        String::from_node(node, path, cx).map(PathBuf::from)
    }
}

impl<T: FromNode> FromNode for Option<T> {
    const EXPECTED: &'static str = T::EXPECTED;
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        match node.kind {
            NodeKind::Null => Some(None),
            _ => T::from_node(node, path, cx).map(Some),
        }
    }
}

/// A list; a single value is accepted as a one-element list.
impl<T: FromNode> FromNode for Vec<T> {
    const EXPECTED: &'static str = "a list";
    fn from_node(node: &Node, path: &str, cx: &mut Ctx) -> Option<Self> {
        match &node.kind {
            NodeKind::Seq(items) => {
                let mut out = Vec::with_capacity(items.len());
                let mut ok = true;
                for (i, item) in items.iter().enumerate() {
                    match T::from_node(item, &format!("{path}[{i}]"), cx) {
                        Some(v) => out.push(v),
                        None => ok = false,
                    }
                }
                ok.then_some(out)
            }
            NodeKind::Map(_) => {
                type_issue::<Self>(node, path, cx);
                None
            }
            _ => T::from_node(node, path, cx).map(|v| vec![v]),
        }
    }
}

/// Edit distance, for "did you mean" suggestions.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Suggests the closest of `options` to `word`, if close enough.
pub fn suggest<'a>(word: &str, options: &[&'a str]) -> Option<&'a str> {
    options
        .iter()
        .map(|o| (distance(word, o), *o))
        .filter(|(d, o)| *d <= 2.max(o.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, o)| o)
}

/// Reports every key of `entries` that is not in `known`.
pub fn check_keys(path: &str, entries: &[(String, Loc, Node)], known: &[&str], cx: &mut Ctx) {
    for (key, loc, _) in entries {
        if !known.contains(&key.as_str()) {
            let hint = match suggest(key, known) {
                Some(s) => format!("did you mean '{s}'? "),
                None => String::new(),
            };
            cx.issue(
                &join(path, key),
                loc,
                format!("unknown key '{key}'; {hint}valid keys here: {}", known.join(", ")),
            );
        }
    }
}

/// Defines a recipe section: a struct with documented, defaulted fields that reads itself
/// from a node (unknown keys are errors) and serialises back to YAML.
#[macro_export]
macro_rules! section {
    ($(#[$meta:meta])* pub struct $name:ident {
        $( $(#[doc = $doc:expr])* $field:ident : $ty:ty = $default:expr ),* $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, serde::Serialize)]
        pub struct $name { $( $(#[doc = $doc])* pub $field: $ty, )* }

        impl Default for $name {
            fn default() -> Self { Self { $( $field: $default, )* } }
        }

        impl $name {
            pub const FIELDS: &'static [&'static str] = &[ $( stringify!($field) ),* ];
        }

        impl $crate::SectionDocs for $name {
            fn field_docs() -> Vec<(&'static str, String)> {
                vec![ $( (stringify!($field), [$($doc),*].iter().map(|s: &&str| s.trim()).collect::<Vec<_>>().join(" ")) ),* ]
            }
        }

        impl $crate::FromNode for $name {
            const EXPECTED: &'static str = "a mapping";
            #[allow(unused_variables)]
            fn from_node(node: &$crate::yaml::Node, path: &str, cx: &mut $crate::Ctx) -> Option<Self> {
                use $crate::yaml::NodeKind;
                let entries = match &node.kind {
                    NodeKind::Null => return Some(Self::default()),
                    NodeKind::Map(e) => e,
                    _ => { $crate::type_issue::<Self>(node, path, cx); return None; }
                };
                $crate::check_keys(path, entries, Self::FIELDS, cx);
                let mut out = Self::default();
                $(
                    if let Some((_, _, v)) = entries.iter().find(|(k, _, _)| k == stringify!($field)) {
                        let p = $crate::join(path, stringify!($field));
                        cx.locs.insert(p.clone(), v.loc.clone());
                        if let Some(x) = <$ty as $crate::FromNode>::from_node(v, &p, cx) {
                            out.$field = x;
                        }
                    }
                )*
                Some(out)
            }
        }
    };
}

/// Defines a string-valued choice (`schedule: cosine`).
#[macro_export]
macro_rules! choice {
    ($(#[$meta:meta])* pub enum $name:ident { $( $(#[doc = $doc:expr])* $var:ident = $s:literal ),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $( $(#[doc = $doc])* $var ),* }

        impl $name {
            pub const NAMES: &'static [&'static str] = &[ $( $s ),* ];
            pub fn as_str(self) -> &'static str { match self { $( Self::$var => $s ),* } }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.as_str()) }
        }
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> ::std::result::Result<S::Ok, S::Error> { s.serialize_str(self.as_str()) }
        }
        impl $crate::FromNode for $name {
            const EXPECTED: &'static str = concat!("one of: ", $( $s, " " ),*);
            fn from_node(node: &$crate::yaml::Node, path: &str, cx: &mut $crate::Ctx) -> Option<Self> {
                let text = match &node.kind {
                    $crate::yaml::NodeKind::Scalar { text, .. } => text.as_str(),
                    _ => { $crate::type_issue::<Self>(node, path, cx); return None; }
                };
                match text {
                    $( $s => Some(Self::$var), )*
                    other => {
                        let hint = match $crate::suggest(other, Self::NAMES) {
                            Some(s) => format!(" (did you mean '{s}'?)"),
                            None => String::new(),
                        };
                        cx.issue(path, &node.loc, format!("'{other}' is not one of {}{hint}", Self::NAMES.join(", ")));
                        None
                    }
                }
            }
        }
    };
}
