//! The parser of filter expressions: recursive descent over the grammar in the module doc.

use regex_automata::meta::Regex;

use super::{Error, Expr, Match, Op, Selector};

/// The input and the position reached.
pub(super) struct Parser<'a> {
    s: &'a str,
    pos: usize,
    /// Open `(` and `not` around the position.
    depth: usize,
    /// Matchers and operators so far.
    nodes: usize,
}

/// How deep `(` and `not` may nest. The parser and the evaluator recurse once per level: a
/// filter of a thousand `(` overflowed a worker thread's stack and aborted the agent.
pub(super) const MAX_DEPTH: usize = 32;
/// How many matchers and operators one expression may hold (an `and` chain nests as deep as it
/// is long in the evaluator).
pub(super) const MAX_NODES: usize = 256;

const KEYWORDS: [&str; 8] = [
    "and", "or", "not", "in", "is", "empty", "contains", "matches",
];

impl Parser<'_> {
    /// Parses all of `input` as one expression.
    pub(super) fn whole(input: &str) -> Result<Expr, Error> {
        let mut p = Parser {
            s: input,
            pos: 0,
            depth: 0,
            nodes: 0,
        };
        let expr = p.or()?;
        p.ws();
        if p.pos < p.s.len() {
            return Err(p.err(format!("unexpected {:?}", p.rest_word())));
        }
        Ok(expr)
    }

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

    /// Counts one more matcher or operator; past [`MAX_NODES`] an error.
    fn node(&mut self) -> Result<(), Error> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(self.err(format!(
                "the expression has more than {MAX_NODES} matchers and operators"
            )));
        }
        Ok(())
    }

    /// Enters one more `(` or `not`; past [`MAX_DEPTH`] an error.
    fn deeper(&mut self) -> Result<(), Error> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err(format!(
                "parentheses and \"not\" nest more than {MAX_DEPTH} levels deep"
            )));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Expr, Error> {
        let mut left = self.and()?;
        while self.keyword("or") {
            self.node()?;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, Error> {
        let mut left = self.not()?;
        while self.keyword("and") {
            self.node()?;
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, Error> {
        if self.keyword("not") {
            self.node()?;
            self.deeper()?;
            let e = Expr::Not(Box::new(self.not()?));
            self.depth -= 1;
            return Ok(e);
        }
        if self.symbol("(") {
            self.deeper()?;
            let e = self.or()?;
            if !self.symbol(")") {
                return Err(self.err(format!("expected \")\", found {:?}", self.rest_word())));
            }
            self.depth -= 1;
            return Ok(e);
        }
        self.node()?;
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
                depth: 0,
                nodes: 0,
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
