//! Diagnostics: what is wrong, where, and what to do about it.

use std::fmt;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding about a cloud-config, positioned in its source file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    /// File path or URL the offending value came from.
    pub source: String,
    /// 1-based line and column; 0 when the finding has no single place
    /// (for example a required key missing from every source).
    pub line: usize,
    pub col: usize,
    /// Full dotted key path, e.g. `geminik8s.cluster.vip`.
    pub key: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}", self.source)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.col)?;
        }
        write!(f, ": {level}: ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n    hint: {hint}")?;
        }
        Ok(())
    }
}

/// Every error (and warning) found in one load, not just the first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter().filter(|d| d.is_error())
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let errors = self.errors().count();
        write!(f, "invalid cloud-config ({errors} error{}):", if errors == 1 { "" } else { "s" })?;
        for d in &self.0 {
            write!(f, "\n  {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// The closest of `candidates` to `word`, if it is close enough to be what
/// the user meant.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (c, strsim::jaro_winkler(word, c)))
        .filter(|(c, score)| *score >= 0.8 || strsim::damerau_levenshtein(word, c) <= 2)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(c, _)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_are_close_or_nothing() {
        assert_eq!(did_you_mean("vipp", ["vip", "vip_prefix", "name"]), Some("vip"));
        assert_eq!(did_you_mean("bootstrap_leadr", ["bootstrap_leader", "name"]), Some("bootstrap_leader"));
        assert_eq!(did_you_mean("zzzzzz", ["vip", "name"]), None);
    }

    #[test]
    fn display_names_file_line_key_and_hint() {
        let d = Diagnostic {
            severity: Severity::Error,
            source: "node1.yaml".into(),
            line: 4,
            col: 8,
            key: "geminik8s.cluster.vip".into(),
            message: "`10.0.0` is not an IP address".into(),
            hint: Some("write an address such as 10.77.0.10".into()),
        };
        assert_eq!(
            d.to_string(),
            "node1.yaml:4:8: error: geminik8s.cluster.vip: `10.0.0` is not an IP address\n    hint: write an address such as 10.77.0.10"
        );
    }
}
