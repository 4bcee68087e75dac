//! YAML parsing that keeps positions.
//!
//! Cloud-config errors must name the file, line and column of the offending
//! key, so the YAML is parsed into a small tree ([`Node`]) whose every value
//! carries where it came from. The tree converts to a `serde_json::Value` for
//! typed deserialisation; scalars are resolved with the YAML 1.2 core schema.

use std::collections::HashMap;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A position in one source: index into the loader's list of sources, and a
/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub source: usize,
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// Keys in document order, each with the position of the key itself.
    Map(Vec<(String, Pos, Node)>),
    Seq(Vec<Node>),
    Scalar {
        text: String,
        quoted: bool,
    },
}

/// One YAML value and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: Kind,
    pub pos: Pos,
}

/// A YAML syntax or structure error with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl Node {
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.kind {
            Kind::Map(entries) => entries.iter().find(|(k, _, _)| k == key).map(|(_, _, v)| v),
            _ => None,
        }
    }

    /// Position of the key `key` in this map.
    pub fn key_pos(&self, key: &str) -> Option<Pos> {
        match &self.kind {
            Kind::Map(entries) => entries.iter().find(|(k, _, _)| k == key).map(|(_, p, _)| *p),
            _ => None,
        }
    }

    /// Follow a dotted path of map keys.
    pub fn lookup(&self, path: &str) -> Option<&Node> {
        path.split('.').try_fold(self, |node, key| node.get(key))
    }

    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            Kind::Map(_) => "a mapping",
            Kind::Seq(_) => "a list",
            Kind::Scalar { .. } => match self.to_json() {
                Value::Null => "empty (null)",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                _ => "a string",
            },
        }
    }

    /// Convert to JSON, resolving plain scalars with the YAML 1.2 core schema.
    pub fn to_json(&self) -> Value {
        match &self.kind {
            Kind::Map(entries) => {
                let mut map = Map::new();
                for (k, _, v) in entries {
                    map.insert(k.clone(), v.to_json());
                }
                Value::Object(map)
            }
            Kind::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Kind::Scalar { text, quoted: true } => Value::String(text.clone()),
            Kind::Scalar { text, quoted: false } => resolve_plain(text),
        }
    }

    /// Deep merge `other` over `self`: mappings merge key by key, anything
    /// else is replaced by the later value.
    pub fn merge(&mut self, other: Node) {
        match (&mut self.kind, other.kind) {
            (Kind::Map(mine), Kind::Map(theirs)) => {
                for (key, key_pos, value) in theirs {
                    match mine.iter_mut().find(|(k, _, _)| *k == key) {
                        Some((_, kp, existing)) => {
                            *kp = key_pos;
                            existing.merge(value);
                        }
                        None => mine.push((key, key_pos, value)),
                    }
                }
            }
            (_, kind) => {
                self.kind = kind;
                self.pos = other.pos;
            }
        }
    }
}

fn resolve_plain(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = text.parse::<i64>() {
        return Value::Number(i.into());
    }
    let looks_numeric = text.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
        && text.chars().any(|c| c.is_ascii_digit());
    if looks_numeric
        && let Ok(f) = text.parse::<f64>()
        && let Some(n) = Number::from_f64(f)
    {
        return Value::Number(n);
    }
    Value::String(text.to_string())
}

enum Frame {
    Map { pos: Pos, anchor: usize, entries: Vec<(String, Pos, Node)>, key: Option<(String, Pos)> },
    Seq { pos: Pos, anchor: usize, items: Vec<Node> },
}

struct Builder {
    source: usize,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    documents: usize,
    error: Option<SyntaxError>,
}

impl Builder {
    fn pos(&self, mark: Marker) -> Pos {
        Pos { source: self.source, line: mark.line(), col: mark.col() + 1 }
    }

    fn fail(&mut self, pos: Pos, message: String) {
        if self.error.is_none() {
            self.error = Some(SyntaxError { line: pos.line, col: pos.col, message });
        }
    }

    fn push_value(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        let pos = node.pos;
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => match node.kind {
                    Kind::Scalar { text, .. } => {
                        if entries.iter().any(|(k, _, _)| *k == text) {
                            let message = format!("duplicate key `{text}` in this mapping");
                            self.fail(pos, message);
                        } else {
                            *key = Some((text, pos));
                        }
                    }
                    _ => self.fail(pos, "mapping keys must be plain strings".to_string()),
                },
                Some((k, kpos)) => entries.push((k, kpos, node)),
            },
        }
    }
}

fn tag_is_str(tag: &Option<Tag>) -> bool {
    matches!(tag, Some(t) if t.suffix == "str" || t.suffix.ends_with(":str"))
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = self.pos(mark);
        match ev {
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents > 1 {
                    self.fail(pos, "a cloud-config file holds one YAML document; found a second `---`".into());
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                let quoted = style != TScalarStyle::Plain || tag_is_str(&tag);
                self.push_value(Node { kind: Kind::Scalar { text, quoted }, pos }, anchor);
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(mut node) => {
                    node.pos = pos;
                    self.push_value(node, 0);
                }
                None => self.fail(pos, "alias to an unknown anchor".into()),
            },
            Event::MappingStart(anchor, _) => {
                self.stack.push(Frame::Map { pos, anchor, entries: Vec::new(), key: None })
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq { pos, anchor, items: Vec::new() }),
            Event::MappingEnd | Event::SequenceEnd => match self.stack.pop() {
                Some(Frame::Map { pos, anchor, entries, .. }) => {
                    self.push_value(Node { kind: Kind::Map(entries), pos }, anchor)
                }
                Some(Frame::Seq { pos, anchor, items }) => {
                    self.push_value(Node { kind: Kind::Seq(items), pos }, anchor)
                }
                None => self.fail(pos, "unbalanced YAML structure".into()),
            },
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => {}
        }
    }
}

/// Parse one YAML document. An empty document is an empty mapping.
pub fn parse(text: &str, source: usize) -> Result<Node, SyntaxError> {
    let mut builder =
        Builder { source, stack: Vec::new(), anchors: HashMap::new(), root: None, documents: 0, error: None };
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, true) {
        let m = e.marker();
        return Err(SyntaxError { line: m.line(), col: m.col() + 1, message: e.info().to_string() });
    }
    if let Some(err) = builder.error {
        return Err(err);
    }
    let empty = Node { kind: Kind::Map(Vec::new()), pos: Pos { source, line: 1, col: 1 } };
    match builder.root {
        None => Ok(empty),
        Some(Node { kind: Kind::Scalar { ref text, quoted: false }, .. }) if resolve_plain(text).is_null() => Ok(empty),
        Some(node) => Ok(node),
    }
}

/// Render a JSON value as YAML text (block style, literal blocks for
/// multi-line strings), for files the CLI writes and `--output yaml`.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    emit(value, 0, &mut out, false);
    out
}

fn needs_quotes(s: &str) -> bool {
    s.is_empty()
        || !matches!(resolve_plain(s), Value::String(_))
        || s.starts_with(|c: char| " -?:,[]{}#&*!|>'\"%@`".contains(c))
        || s.ends_with(' ')
        || s.contains(": ")
        || s.contains(" #")
        || s.ends_with(':')
        || s.chars().any(|c| c.is_control())
}

fn scalar(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if needs_quotes(s) => serde_json::to_string(s).expect("strings serialise"),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Object(o) if o.is_empty() => "{}".into(),
        _ => unreachable!("containers are emitted as blocks"),
    }
}

fn is_block(value: &Value) -> bool {
    match value {
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::String(s) => s.contains('\n') && !s.chars().any(|c| c.is_control() && c != '\n'),
        _ => false,
    }
}

fn emit(value: &Value, indent: usize, out: &mut String, in_seq: bool) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (i, (k, v)) in map.iter().enumerate() {
                if !(in_seq && i == 0) {
                    out.push_str(&pad);
                }
                let key =
                    if needs_quotes(k) { serde_json::to_string(k).expect("strings serialise") } else { k.clone() };
                out.push_str(&key);
                out.push(':');
                emit_child(v, indent + 2, out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                if !(in_seq && i == 0) {
                    out.push_str(&pad);
                }
                out.push('-');
                match item {
                    Value::Object(m) if !m.is_empty() => {
                        out.push(' ');
                        emit(item, indent + 2, out, true);
                    }
                    _ => emit_child(item, indent + 2, out),
                }
            }
        }
        other => {
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
}

fn emit_child(v: &Value, indent: usize, out: &mut String) {
    if !is_block(v) {
        out.push(' ');
        out.push_str(&scalar(v));
        out.push('\n');
        return;
    }
    if let Value::String(s) = v {
        out.push_str(if s.ends_with('\n') { " |\n" } else { " |-\n" });
        for line in s.trim_end_matches('\n').split('\n') {
            if !line.is_empty() {
                out.push_str(&" ".repeat(indent));
                out.push_str(line);
            }
            out.push('\n');
        }
        return;
    }
    out.push('\n');
    emit(v, indent, out, false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn positions_are_one_based_and_point_at_values() {
        let node = parse("a:\n  b: 1\n  c: [x, 'y']\n", 0).unwrap();
        let b = node.lookup("a.b").unwrap();
        assert_eq!((b.pos.line, b.pos.col), (2, 6));
        assert_eq!(node.get("a").unwrap().key_pos("c").map(|p| (p.line, p.col)), Some((3, 3)));
        assert_eq!(node.to_json(), json!({"a": {"b": 1, "c": ["x", "y"]}}));
    }

    #[test]
    fn core_schema_resolution_keeps_quoted_strings() {
        let node = parse("a: '1'\nb: 1\nc: true\nd: \"true\"\ne: ~\nf: 1.5\ng: 10.77.0.1\nh: !!str 5\n", 0).unwrap();
        assert_eq!(
            node.to_json(),
            json!({"a": "1", "b": 1, "c": true, "d": "true", "e": null, "f": 1.5, "g": "10.77.0.1", "h": "5"})
        );
    }

    #[test]
    fn duplicate_keys_are_errors_with_position() {
        let err = parse("a: 1\nb: 2\na: 3\n", 0).unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.message.contains("duplicate key `a`"), "{err:?}");
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let err = parse("a:\n  b: [1, 2\n", 0).unwrap_err();
        assert!(err.line >= 2, "{err:?}");
    }

    #[test]
    fn merge_is_deep_for_maps_and_replaces_the_rest() {
        let mut a = parse("x:\n  y: 1\n  z: [1]\nk: a\n", 0).unwrap();
        let b = parse("x:\n  z: [2, 3]\n  w: true\n", 1).unwrap();
        a.merge(b);
        assert_eq!(a.to_json(), json!({"x": {"y": 1, "z": [2, 3], "w": true}, "k": "a"}));
        assert_eq!(a.lookup("x.z").unwrap().pos.source, 1);
        assert_eq!(a.lookup("x.y").unwrap().pos.source, 0);
    }

    #[test]
    fn emitted_yaml_parses_back_to_the_same_value() {
        let v = json!({
            "name": "lab", "n": 3, "flag": false, "empty": "", "looks_bool": "true",
            "pem": "-----BEGIN X-----\nabc\n-----END X-----\n",
            "list": ["a", {"k": 1, "j": [1, 2]}, []],
            "nested": {"deep": {"x": "a: b"}}, "colon": "10.0.0.1:80",
        });
        let text = to_yaml(&v);
        assert_eq!(parse(&text, 0).unwrap().to_json(), v, "{text}");
    }
}
