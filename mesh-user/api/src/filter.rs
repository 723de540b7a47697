//! Consul's `?filter=` expressions (the go-bexpr language) over the JSON of the objects a list
//! endpoint returns: selectors are the JSON field names Consul's are (`SourceName`,
//! `Meta.env`, `Meta["a key"]`), so one parser and one evaluator serve every list.
//!
//! The grammar, as go-bexpr's:
//!
//! ```text
//! expr     = or
//! or       = and ("or" and)*
//! and      = not ("and" not)*
//! not      = "not" not | "(" expr ")" | match
//! match    = selector ("==" | "!=") value
//!          | selector ("contains" | "not contains" | "matches" | "not matches") value
//!          | value ("in" | "not in") selector
//!          | selector "is" ["not"] "empty"
//! selector = name ("." name | "[" quoted "]")*
//! value    = "double-quoted" | `raw` | bare word
//! ```
//!
//! Selectors are checked against the fields of the type being filtered, as Consul checks
//! them against its Go type: [`Filter::parse_for`] refuses a selector whose first field the
//! type does not have, whatever the data. A field the type has but an object leaves out (an
//! empty `Meta`), or a missing key further in (a `Meta` key), is a value that equals nothing
//! and is empty.

use std::fmt;

use regex_automata::meta::Regex;
use serde_json::Value;

/// Why an expression cannot be parsed or evaluated; the message names the problem (and,
/// for a syntax error, the column).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The expression is not in the language.
    #[error("Failed to create boolean expression evaluator: {message} (at column {column})")]
    Syntax {
        /// 1-based column where it went wrong.
        column: usize,
        /// What was expected or found.
        message: String,
    },
    /// A `matches` pattern is not a regular expression.
    #[error("Failed to create boolean expression evaluator: invalid regular expression {pattern:?}: {source}")]
    Regex {
        /// The pattern.
        pattern: String,
        /// The regex error.
        source: Box<regex_automata::meta::BuildError>,
    },
    /// A selector names a field the filtered objects do not have, or goes into one that is
    /// not an object.
    #[error("Selector {0:?} is not valid")]
    Selector(String),
    /// The operator does not apply to the selected field's type.
    #[error("Invalid match operator {op:?} for selector {selector:?}: {why}")]
    Operator {
        /// The operator as written.
        op: &'static str,
        /// The selector.
        selector: String,
        /// Why (the field's type).
        why: String,
    },
}

/// A parsed filter expression.
#[derive(Debug)]
pub struct Filter {
    expr: Expr,
}

#[derive(Debug)]
enum Expr {
    Or(Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Match(Match),
}

#[derive(Debug)]
struct Match {
    selector: Selector,
    op: Op,
    value: String,
}

#[derive(Debug)]
enum Op {
    Equal,
    NotEqual,
    In,
    NotIn,
    Contains,
    NotContains,
    Matches(Box<Regex>),
    NotMatches(Box<Regex>),
    IsEmpty,
    IsNotEmpty,
}

impl Op {
    fn as_str(&self) -> &'static str {
        match self {
            Op::Equal => "==",
            Op::NotEqual => "!=",
            Op::In => "in",
            Op::NotIn => "not in",
            Op::Contains => "contains",
            Op::NotContains => "not contains",
            Op::Matches(_) => "matches",
            Op::NotMatches(_) => "not matches",
            Op::IsEmpty => "is empty",
            Op::IsNotEmpty => "is not empty",
        }
    }
}

/// A field path: `Meta.env` is `["Meta", "env"]`.
#[derive(Debug)]
struct Selector(Vec<String>);

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

impl Filter {
    /// Parses an expression.
    ///
    /// # Errors
    /// [`Error::Syntax`] naming the column and what was expected; [`Error::Regex`] for a
    /// `matches` pattern that is not a regular expression.
    pub fn parse(input: &str) -> Result<Filter, Error> {
        let mut p = Parser { s: input, pos: 0 };
        let expr = p.or()?;
        p.ws();
        if p.pos < p.s.len() {
            return Err(p.err(format!("unexpected {:?}", p.rest_word())));
        }
        Ok(Filter { expr })
    }

    /// Parses an expression for objects with these top-level `fields` (the JSON names of
    /// the filtered type): a selector that starts with another name is refused.
    ///
    /// # Errors
    /// As [`Filter::parse`], and [`Error::Selector`] for a selector the type does not have.
    pub fn parse_for(input: &str, fields: &[&str]) -> Result<Filter, Error> {
        let filter = Filter::parse(input)?;
        let mut stack = vec![&filter.expr];
        while let Some(e) = stack.pop() {
            match e {
                Expr::Or(a, b) | Expr::And(a, b) => stack.extend([&**a, &**b]),
                Expr::Not(a) => stack.push(a),
                Expr::Match(m) => {
                    if !m
                        .selector
                        .0
                        .first()
                        .is_some_and(|f| fields.contains(&f.as_str()))
                    {
                        return Err(Error::Selector(m.selector.to_string()));
                    }
                }
            }
        }
        Ok(filter)
    }

    /// Whether `item` (one object of a list) passes.
    ///
    /// # Errors
    /// [`Error::Selector`] when a selector goes into a field that is neither an object nor
    /// absent; [`Error::Operator`] when an operator does not apply to the field's type.
    pub fn matches(&self, item: &Value) -> Result<bool, Error> {
        eval(&self.expr, item)
    }

    /// The items that pass, in order.
    ///
    /// # Errors
    /// As [`Filter::matches`], on the first item that fails.
    pub fn apply(&self, items: Vec<Value>) -> Result<Vec<Value>, Error> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if self.matches(&item)? {
                out.push(item);
            }
        }
        Ok(out)
    }
}

fn eval(expr: &Expr, item: &Value) -> Result<bool, Error> {
    Ok(match expr {
        Expr::Or(a, b) => eval(a, item)? || eval(b, item)?,
        Expr::And(a, b) => eval(a, item)? && eval(b, item)?,
        Expr::Not(a) => !eval(a, item)?,
        Expr::Match(m) => eval_match(m, item)?,
    })
}

/// The selected value: `None` when a key below the first is missing.
fn select<'v>(sel: &Selector, item: &'v Value) -> Result<Option<&'v Value>, Error> {
    let invalid = || Error::Selector(sel.to_string());
    let mut parts = sel.0.iter();
    let first = parts.next().ok_or_else(invalid)?;
    let Some(mut cur) = item.as_object().ok_or_else(invalid)?.get(first) else {
        return Ok(None);
    };
    for part in parts {
        match cur {
            Value::Object(o) => match o.get(part) {
                Some(v) => cur = v,
                None => return Ok(None),
            },
            Value::Null => return Ok(None),
            _ => return Err(invalid()),
        }
    }
    Ok(Some(cur))
}

/// Whether a scalar equals the literal as go-bexpr coerces it (string, number, bool).
fn equals(field: &Value, lit: &str) -> bool {
    match field {
        Value::String(s) => s == lit,
        Value::Bool(b) => lit.parse::<bool>().is_ok_and(|l| l == *b),
        Value::Number(n) => {
            if let (Some(a), Ok(b)) = (n.as_i64(), lit.parse::<i64>()) {
                a == b
            } else if let (Some(a), Ok(b)) = (n.as_u64(), lit.parse::<u64>()) {
                a == b
            } else {
                matches!((n.as_f64(), lit.parse::<f64>()), (Some(a), Ok(b)) if a == b)
            }
        }
        _ => false,
    }
}

fn eval_match(m: &Match, item: &Value) -> Result<bool, Error> {
    let field = select(&m.selector, item)?;
    let wrong = |why: &str| Error::Operator {
        op: m.op.as_str(),
        selector: m.selector.to_string(),
        why: why.to_owned(),
    };
    let field = field.filter(|v| !v.is_null());
    Ok(match &m.op {
        Op::Equal | Op::NotEqual => {
            let eq = match field {
                None => false,
                Some(Value::Array(_) | Value::Object(_)) => {
                    return Err(wrong("the field is a list or a map; use in or contains"))
                }
                Some(v) => equals(v, &m.value),
            };
            eq == matches!(m.op, Op::Equal)
        }
        Op::In | Op::NotIn | Op::Contains | Op::NotContains => {
            let has = match field {
                None => false,
                Some(Value::String(s)) => s.contains(m.value.as_str()),
                Some(Value::Array(a)) => a.iter().any(|v| equals(v, &m.value)),
                Some(Value::Object(o)) => o.contains_key(&m.value),
                Some(_) => return Err(wrong("the field is not a string, a list or a map")),
            };
            has == matches!(m.op, Op::In | Op::Contains)
        }
        Op::Matches(re) | Op::NotMatches(re) => {
            let is = match field {
                None => false,
                Some(Value::String(s)) => re.is_match(s.as_str()),
                Some(_) => return Err(wrong("the field is not a string")),
            };
            is == matches!(m.op, Op::Matches(_))
        }
        Op::IsEmpty | Op::IsNotEmpty => {
            let empty = match field {
                None => true,
                Some(Value::String(s)) => s.is_empty(),
                Some(Value::Array(a)) => a.is_empty(),
                Some(Value::Object(o)) => o.is_empty(),
                Some(_) => return Err(wrong("the field is not a string, a list or a map")),
            };
            empty == matches!(m.op, Op::IsEmpty)
        }
    })
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

const KEYWORDS: [&str; 8] = [
    "and", "or", "not", "in", "is", "empty", "contains", "matches",
];

impl Parser<'_> {
    fn err(&self, message: impl Into<String>) -> Error {
        Error::Syntax {
            column: self.s[..self.pos].chars().count() + 1,
            message: message.into(),
        }
    }

    fn rest(&self) -> &str {
        &self.s[self.pos..]
    }

    fn ws(&mut self) {
        let rest = self.rest();
        self.pos += rest.len() - rest.trim_start().len();
    }

    /// The next bare word (for messages), or "end of input".
    fn rest_word(&self) -> String {
        let w: String = self
            .rest()
            .chars()
            .take_while(|c| !c.is_whitespace())
            .collect();
        if w.is_empty() {
            "end of input".into()
        } else {
            w
        }
    }

    /// Consumes the keyword `kw` (case-insensitive) when it is next and ends there.
    fn keyword(&mut self, kw: &str) -> bool {
        self.ws();
        let rest = self.rest();
        if rest.len() >= kw.len()
            && rest.is_char_boundary(kw.len())
            && rest[..kw.len()].eq_ignore_ascii_case(kw)
        {
            let after = rest[kw.len()..].chars().next();
            if after.is_none_or(|c| c.is_whitespace() || c == '(' || c == ')' || c == '"') {
                self.pos += kw.len();
                return true;
            }
        }
        false
    }

    /// Consumes `sym` (`==`, `!=`, `(`, `)`) when it is next.
    fn symbol(&mut self, sym: &str) -> bool {
        self.ws();
        if self.rest().starts_with(sym) {
            self.pos += sym.len();
            true
        } else {
            false
        }
    }

    /// Consumes `not` then `kw` (both keywords) when they are next; leaves the input alone
    /// otherwise.
    fn not_then(&mut self, kw: &str) -> bool {
        let save = self.pos;
        if self.keyword("not") && self.keyword(kw) {
            return true;
        }
        self.pos = save;
        false
    }

    fn or(&mut self) -> Result<Expr, Error> {
        let mut left = self.and()?;
        while self.keyword("or") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, Error> {
        let mut left = self.not()?;
        while self.keyword("and") {
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, Error> {
        if self.keyword("not") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        if self.symbol("(") {
            let e = self.or()?;
            if !self.symbol(")") {
                return Err(self.err(format!("expected \")\", found {:?}", self.rest_word())));
            }
            return Ok(e);
        }
        self.matcher()
    }

    fn matcher(&mut self) -> Result<Expr, Error> {
        self.ws();
        let start = self.pos;
        let quoted = matches!(self.rest().chars().next(), Some('"' | '`'));
        let first = self.value()?;
        let first_end = self.pos;
        // value ("in" | "not in") selector
        let in_op = if self.keyword("in") {
            Some(Op::In)
        } else if self.not_then("in") {
            Some(Op::NotIn)
        } else {
            None
        };
        if let Some(op) = in_op {
            self.ws();
            let selector = self.selector()?;
            return Ok(Expr::Match(Match {
                selector,
                op,
                value: first,
            }));
        }
        if quoted {
            self.pos = start;
            return Err(self.err("expected a selector, found a quoted value"));
        }
        let selector = {
            let mut p = Parser {
                s: self.s,
                pos: start,
            };
            let sel = p.selector()?;
            if p.pos != first_end {
                return Err(p.err(format!("invalid selector {first:?}")));
            }
            sel
        };
        let (op, value) = if self.symbol("==") {
            (Op::Equal, self.value()?)
        } else if self.symbol("!=") {
            (Op::NotEqual, self.value()?)
        } else if self.keyword("contains") {
            (Op::Contains, self.value()?)
        } else if self.not_then("contains") {
            (Op::NotContains, self.value()?)
        } else if self.keyword("matches") {
            (Op::Matches(self.regex()?), String::new())
        } else if self.not_then("matches") {
            (Op::NotMatches(self.regex()?), String::new())
        } else if self.keyword("is") {
            let negated = self.keyword("not");
            if !self.keyword("empty") {
                return Err(self.err(format!("expected \"empty\", found {:?}", self.rest_word())));
            }
            (
                if negated { Op::IsNotEmpty } else { Op::IsEmpty },
                String::new(),
            )
        } else {
            return Err(self.err(format!(
                "expected a match operator (==, !=, in, not in, contains, not contains, \
                 matches, not matches, is empty, is not empty) after {first:?}, found {:?}",
                self.rest_word()
            )));
        };
        Ok(Expr::Match(Match {
            selector,
            op,
            value,
        }))
    }

    fn regex(&mut self) -> Result<Box<Regex>, Error> {
        let pattern = self.value()?;
        Regex::new(&pattern)
            .map(Box::new)
            .map_err(|source| Error::Regex {
                pattern,
                source: Box::new(source),
            })
    }

    /// A quoted string (`"…"` with `\` escapes, or `` `…` `` raw) or a bare word (up to
    /// whitespace, a parenthesis, `=` or `!`; brackets kept whole).
    fn value(&mut self) -> Result<String, Error> {
        self.ws();
        let mut chars = self.rest().char_indices();
        match chars.next() {
            None => Err(self.err("expected a value, found end of input")),
            Some((_, '"')) => {
                let mut out = String::new();
                let mut escaped = false;
                for (i, c) in chars {
                    if escaped {
                        out.push(match c {
                            'n' => '\n',
                            't' => '\t',
                            c => c,
                        });
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        self.pos += i + 1;
                        return Ok(out);
                    } else {
                        out.push(c);
                    }
                }
                Err(self.err("unterminated quoted value"))
            }
            Some((_, '`')) => match self.rest()[1..].find('`') {
                Some(end) => {
                    let out = self.rest()[1..1 + end].to_owned();
                    self.pos += end + 2;
                    Ok(out)
                }
                None => Err(self.err("unterminated raw value")),
            },
            Some(_) => {
                let rest = self.rest();
                let mut end = rest.len();
                let mut in_bracket = false;
                let mut in_quote = false;
                for (i, c) in rest.char_indices() {
                    match c {
                        '"' if in_bracket => in_quote = !in_quote,
                        _ if in_quote => {}
                        '[' => in_bracket = true,
                        ']' => in_bracket = false,
                        _ if in_bracket => {}
                        c if c.is_whitespace() || matches!(c, '(' | ')' | '=' | '!') => {
                            end = i;
                            break;
                        }
                        _ => {}
                    }
                }
                if end == 0 {
                    return Err(self.err(format!("expected a value, found {:?}", self.rest_word())));
                }
                let word = rest[..end].to_owned();
                if KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(&word)) {
                    return Err(self.err(format!("expected a value, found keyword {word:?}")));
                }
                self.pos += end;
                Ok(word)
            }
        }
    }

    /// `Name`, `Meta.key`, `Meta["a key"]`.
    fn selector(&mut self) -> Result<Selector, Error> {
        // A field name; a map key after "." may also start with a digit.
        let ident = |p: &mut Parser<'_>, first: bool| -> Result<String, Error> {
            let rest = &p.s[p.pos..];
            let mut end = 0;
            for (i, c) in rest.char_indices() {
                let ok = if i == 0 && first {
                    c.is_ascii_alphabetic() || c == '_'
                } else {
                    c.is_ascii_alphanumeric() || c == '_' || c == '-'
                };
                if !ok {
                    break;
                }
                end = i + c.len_utf8();
            }
            if end == 0 {
                return Err(p.err(format!("expected a selector, found {:?}", p.rest_word())));
            }
            p.pos += end;
            Ok(rest[..end].to_owned())
        };
        let mut parts = vec![ident(self, true)?];
        loop {
            if self.rest().starts_with('.') {
                self.pos += 1;
                parts.push(ident(self, false)?);
            } else if self.rest().starts_with('[') {
                self.pos += 1;
                if !self.rest().starts_with('"') {
                    return Err(self.err("expected a quoted key after \"[\""));
                }
                let key = self.value()?;
                if !self.rest().starts_with(']') {
                    return Err(self.err("expected \"]\""));
                }
                self.pos += 1;
                parts.push(key);
            } else {
                break;
            }
        }
        Ok(Selector(parts))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn items() -> Vec<Value> {
        vec![
            json!({"SourceName": "web", "SourceNS": "default", "Action": "allow",
                   "Precedence": 9, "Meta": {"env": "prod", "a key": "x"}, "Tags": ["a", "b"],
                   "Description": ""}),
            json!({"SourceName": "admin", "SourceNS": "ops", "Action": "deny",
                   "Precedence": 5, "Meta": {}, "Tags": [], "Description": "no"}),
        ]
    }

    fn names(expr: &str) -> Vec<String> {
        Filter::parse(expr)
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
            .apply(items())
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
            .iter()
            .map(|v| v["SourceName"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn operators() {
        let cases: &[(&str, &[&str])] = &[
            ("SourceName == web", &["web"]),
            ("SourceName == \"web\"", &["web"]),
            ("SourceName==`web`", &["web"]),
            ("SourceName != web", &["admin"]),
            ("Precedence == 5", &["admin"]),
            ("a in Tags", &["web"]),
            ("\"a\" not in Tags", &["admin"]),
            ("env in Meta", &["web"]),
            ("Tags contains b", &["web"]),
            ("SourceName contains dm", &["admin"]),
            ("SourceName not contains dm", &["web"]),
            ("SourceName matches \"^w.b$\"", &["web"]),
            ("SourceName not matches \"^w\"", &["admin"]),
            ("Meta is empty", &["admin"]),
            ("Meta is not empty", &["web"]),
            ("Description is empty", &["web"]),
            ("Meta.env == prod", &["web"]),
            ("Meta[\"a key\"] == x", &["web"]),
            ("Meta.missing is empty", &["web", "admin"]),
            ("Meta.env != prod", &["admin"]),
        ];
        for (expr, want) in cases {
            assert_eq!(names(expr), *want, "{expr}");
        }
    }

    #[test]
    fn boolean_logic_and_precedence() {
        assert_eq!(
            names("SourceName == web or SourceName == admin and Action == allow"),
            ["web"]
        );
        assert_eq!(
            names("(SourceName == web or SourceName == admin) and Action == deny"),
            ["admin"]
        );
        assert_eq!(names("not SourceName == web"), ["admin"]);
        assert_eq!(
            names("not (Action == allow or Action == deny)"),
            Vec::<String>::new()
        );
        assert_eq!(names("SourceNS == ops AND Action == deny"), ["admin"]);
    }

    #[test]
    fn errors_name_the_problem() {
        let syntax = |expr: &str, want: &str| {
            let e = Filter::parse(expr).unwrap_err().to_string();
            assert!(e.contains(want), "{expr}: {e}");
            assert!(
                e.starts_with("Failed to create boolean expression evaluator"),
                "{expr}: {e}"
            );
        };
        syntax("SourceName", "expected a match operator");
        syntax("SourceName ==", "expected a value");
        syntax("SourceName == \"web", "unterminated");
        syntax("(SourceName == web", "expected \")\"");
        syntax("SourceName == web and", "found end of input");
        syntax("SourceName == web extra", "unexpected \"extra\"");
        syntax("SourceName matches \"(\"", "invalid regular expression");
        syntax("\"web\" == SourceName", "expected a selector");
        syntax("SourceName is full", "expected \"empty\"");
        let fields = ["SourceName", "Meta", "Tags", "Description"];
        assert_eq!(
            Filter::parse_for("SourceName == a or (Nope == x)", &fields)
                .unwrap_err()
                .to_string(),
            "Selector \"Nope\" is not valid"
        );
        // A field of the type that an object leaves out is absent, not an error.
        let f = Filter::parse_for("Description is empty and not Meta.x == y", &fields).unwrap();
        assert!(f.matches(&json!({"SourceName": "web"})).unwrap());
        let f = Filter::parse("Tags == a").unwrap();
        assert!(f.apply(items()).unwrap_err().to_string().contains("\"==\""));
        let f = Filter::parse("SourceName.x == a").unwrap();
        assert!(matches!(f.apply(items()), Err(Error::Selector(_))));
    }
}
