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

mod parse;

use parse::Parser;

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
        Ok(Filter {
            expr: Parser::whole(input)?,
        })
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

#[cfg(test)]
mod tests;
