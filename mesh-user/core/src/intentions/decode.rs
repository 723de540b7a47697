//! Strict JSON and HCL decoding that reports the path of the field that went wrong.

use serde::de::DeserializeOwned;

use super::{Error, Format, Result};

fn malformed(format: Format, field: String, message: impl ToString) -> Error {
    Error::Malformed {
        format,
        field,
        message: message.to_string().trim().to_owned(),
    }
}

/// The path serde_path_to_error reports, completed for errors it reports at the enclosing
/// struct: "duplicate field `Name`" at `Sources[0]` is about `Sources[0].Name`.
fn error_path(path: &serde_path_to_error::Path, message: &str) -> String {
    let mut field = path.to_string();
    if field == "." {
        field.clear();
    }
    if let Some(rest) = message.strip_prefix("duplicate field `") {
        if let Some((name, _)) = rest.split_once('`') {
            if !field.is_empty() {
                field.push('.');
            }
            field.push_str(name);
        }
    }
    field
}

/// Decodes JSON into `T`, rejecting trailing data; errors carry the field path
/// (`Sources[1].Foo`).
pub(crate) fn json<T: DeserializeOwned>(input: &str) -> Result<T> {
    let mut de = serde_json::Deserializer::from_str(input);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let message = e.inner().to_string();
        malformed(Format::Json, error_path(e.path(), &message), message)
    })?;
    de.end()
        .map_err(|e| malformed(Format::Json, String::new(), e))?;
    Ok(value)
}

/// Decodes HCL into `T`. The document is parsed, checked for attributes given twice (which
/// the HCL-to-JSON mapping would silently merge), evaluated without variables or functions
/// (so heredocs and plain literals work, references are errors), mapped to its JSON form, and
/// then decoded like JSON. `wrap_in_array` names keys (at any depth) whose single-block form
/// (`Sources { ... }`) must become a one-element list.
pub(crate) fn hcl<T: DeserializeOwned>(input: &str, wrap_in_array: &[&str]) -> Result<T> {
    use hcl::eval::{Context, Evaluate};

    check_nesting(input)?;
    let body: hcl::Body =
        hcl::parse(input).map_err(|e| malformed(Format::Hcl, String::new(), e))?;
    check_duplicates(&body, "")?;
    check_literals(&body, "")?;
    let body = body
        .evaluate(&Context::new())
        .map_err(|e| malformed(Format::Hcl, String::new(), e))?;
    let mut value: serde_json::Value =
        hcl::from_body(body).map_err(|e| malformed(Format::Hcl, String::new(), e))?;
    wrap_blocks(&mut value, wrap_in_array);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let message = e.inner().to_string();
        malformed(Format::Hcl, error_path(e.path(), &message), message)
    })
}

/// How deep brackets (`(`, `[`, `{`, and `${`/`%{` in templates) may nest in an HCL config
/// entry. The deepest Consul entry, an L7 header match written as lists of objects
/// (`Sources = [{ Permissions = [{ HTTP = { Header = [{ ... }] } }] }]`), nests 7 levels.
pub(crate) const MAX_HCL_NESTING: usize = 10;

/// Refuses documents that nest brackets deeper than [`MAX_HCL_NESTING`], before the parser
/// sees them. hcl-rs's parser backtracks exponentially on unclosed groups that hold binary
/// operations: `K= (3-3- (3-3- ...` took 1 s at 18 levels and over 10 s at 22, and the
/// `config_entry_hcl` fuzz target's 1 KiB inputs (unclosed `%{`, which outside a string is a
/// modulo and an object) took minutes. A small lexer follows quoted strings (with their escapes
/// and `${`/`%{` templates), heredocs and comments, so brackets in text do not count.
fn check_nesting(input: &str) -> Result<()> {
    #[derive(Clone, Copy)]
    enum Ctx<'a> {
        /// Expressions; the field is the depth at which a template interpolation opened.
        Expr(Option<usize>),
        Quoted,
        Heredoc(&'a str),
    }
    let b = input.as_bytes();
    let mut stack = vec![Ctx::Expr(None)];
    let mut depth = 0usize;
    let mut i = 0;
    let too_deep = |at: usize| {
        let before = &input[..at];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |n| n + 1) + 1;
        Err(malformed(
            Format::Hcl,
            String::new(),
            format!(
                "brackets nest more than {MAX_HCL_NESTING} levels deep (line {line}, column \
                 {column}); a config entry needs at most 7"
            ),
        ))
    };
    let skip_to = |from: usize, end: &str| {
        input[from..]
            .find(end)
            .map_or(b.len(), |n| from + n + end.len())
    };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        let ctx = *stack.last().unwrap_or(&Ctx::Expr(None));
        match ctx {
            Ctx::Expr(interp) => match (c, next) {
                (b'"', _) => {
                    stack.push(Ctx::Quoted);
                    i += 1;
                }
                (b'#', _) | (b'/', Some(b'/')) => i = skip_to(i, "\n"),
                (b'/', Some(b'*')) => i = skip_to(i + 2, "*/"),
                (b'<', Some(b'<')) => {
                    let rest = &input[i + 2..];
                    let rest = rest.strip_prefix('-').unwrap_or(rest);
                    let marker_len = rest
                        .bytes()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-')
                        .count();
                    let marker = &rest[..marker_len];
                    let after = &rest[marker_len..];
                    let after = after.strip_prefix('\r').unwrap_or(after);
                    if !marker.is_empty() && after.starts_with('\n') {
                        stack.push(Ctx::Heredoc(marker));
                        i = b.len() - after.len() + 1;
                    } else {
                        i += 2;
                    }
                }
                (b'(' | b'[' | b'{', _) => {
                    depth += 1;
                    if depth > MAX_HCL_NESTING {
                        return too_deep(i);
                    }
                    i += 1;
                }
                (b'}', _) if interp == Some(depth) => {
                    stack.pop();
                    depth = depth.saturating_sub(1);
                    i += 1;
                }
                (b')' | b']' | b'}', _) => {
                    depth = depth.saturating_sub(1);
                    i += 1;
                }
                _ => i += 1,
            },
            Ctx::Quoted | Ctx::Heredoc(_) => {
                if let Ctx::Heredoc(marker) = ctx {
                    if i == 0 || b[i - 1] == b'\n' {
                        let end = input[i..].find('\n').map_or(b.len(), |n| i + n);
                        if input[i..end].trim() == marker {
                            stack.pop();
                            i = end;
                            continue;
                        }
                    }
                }
                match (c, next) {
                    (b'\\', _) if matches!(ctx, Ctx::Quoted) => i += 2,
                    (b'"' | b'\n', _) if matches!(ctx, Ctx::Quoted) => {
                        // The end of the string (an unterminated one is the parser's error).
                        stack.pop();
                        i += 1;
                    }
                    (b'$', Some(b'$')) | (b'%', Some(b'%')) => i += 2,
                    (b'$' | b'%', Some(b'{')) => {
                        depth += 1;
                        if depth > MAX_HCL_NESTING {
                            return too_deep(i);
                        }
                        stack.push(Ctx::Expr(Some(depth)));
                        i += 2;
                    }
                    _ => i += 1,
                }
            }
        }
    }
    Ok(())
}

/// Turns a single block (an object) under one of the `keys`, at any depth, into a one-element
/// list: `Sources { ... }` or `Permissions { ... }` written once reads as a list of one.
fn wrap_blocks(value: &mut serde_json::Value, keys: &[&str]) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if keys.contains(&key.as_str()) && v.is_object() {
                    *v = serde_json::Value::Array(vec![v.take()]);
                }
                wrap_blocks(v, keys);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| wrap_blocks(v, keys)),
        _ => {}
    }
}

/// Rejects arithmetic, logic, conditionals, `for` expressions, references, index expressions,
/// function calls and template interpolation
/// (`${...}`, `%{...}`): a config entry is literals (Consul's HCL has none of these), and
/// hcl-rs's evaluator asserts on a non-finite result (`k = 2/0` panicked in debug builds; found
/// by the `config_entry_hcl` fuzz target).
fn check_literals(body: &hcl::Body, prefix: &str) -> Result<()> {
    for structure in body.iter() {
        match structure {
            hcl::Structure::Attribute(attr) => {
                check_literal(&attr.expr, &format!("{prefix}{}", attr.key()))?
            }
            hcl::Structure::Block(block) => {
                check_literals(block.body(), &format!("{prefix}{}.", block.identifier()))?
            }
        }
    }
    Ok(())
}

fn check_literal(expr: &hcl::Expression, field: &str) -> Result<()> {
    use hcl::expr::{ObjectKey, TemplateExpr};
    use hcl::Expression as E;

    let refuse = |what: &str| {
        Err(malformed(
            Format::Hcl,
            field.to_owned(),
            format!("{field}: {what} are not supported in a config entry"),
        ))
    };
    match expr {
        E::Operation(_) => refuse("arithmetic and logical operations"),
        E::Conditional(_) => refuse("conditional expressions"),
        E::ForExpr(_) => refuse("for expressions"),
        E::TemplateExpr(t) => {
            let raw = match t.as_ref() {
                TemplateExpr::QuotedString(s) => s.as_str(),
                TemplateExpr::Heredoc(h) => h.template.as_str(),
            };
            let unescaped = raw.replace("$${", "").replace("%%{", "");
            if unescaped.contains("${") || unescaped.contains("%{") {
                refuse("template interpolations and directives")
            } else {
                Ok(())
            }
        }
        E::Array(items) => items.iter().try_for_each(|e| check_literal(e, field)),
        E::Object(object) => object.iter().try_for_each(|(k, v)| {
            if let ObjectKey::Expression(k) = k {
                check_literal(k, field)?;
            }
            check_literal(v, field)
        }),
        E::Parenthesis(e) => check_literal(e, field),
        // Evaluated without variables, a reference is an error anyway; but an index
        // expression on a literal (`0[5*5...]`) is evaluated, and hcl-rs's integer arithmetic
        // overflowed there (a panic in debug builds, found by the `config_entry_hcl` fuzz
        // target).
        E::Traversal(_) | E::Variable(_) => refuse("references and index expressions"),
        E::FuncCall(_) => refuse("function calls"),
        _ => Ok(()),
    }
}

/// Rejects an attribute or block name used twice at one level (blocks may repeat: repeated
/// blocks form a list).
fn check_duplicates(body: &hcl::Body, prefix: &str) -> Result<()> {
    use std::collections::HashMap;

    let mut attrs: HashMap<&str, ()> = HashMap::new();
    let mut blocks: HashMap<&str, usize> = HashMap::new();
    for structure in body.iter() {
        match structure {
            hcl::Structure::Attribute(attr) => {
                let key = attr.key();
                if attrs.insert(key, ()).is_some() || blocks.contains_key(key) {
                    return Err(malformed(
                        Format::Hcl,
                        format!("{prefix}{key}"),
                        format!("{prefix}{key} is defined more than once"),
                    ));
                }
            }
            hcl::Structure::Block(block) => {
                let key = block.identifier();
                if attrs.contains_key(key) {
                    return Err(malformed(
                        Format::Hcl,
                        format!("{prefix}{key}"),
                        format!("{prefix}{key} is defined both as an attribute and as a block"),
                    ));
                }
                let n = blocks.entry(key).or_insert(0);
                let here = format!("{prefix}{key}[{n}].");
                *n += 1;
                check_duplicates(block.body(), &here)?;
            }
        }
    }
    Ok(())
}
