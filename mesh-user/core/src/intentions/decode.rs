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

/// Rejects arithmetic, logic, conditionals, `for` expressions and template interpolation
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
        E::Traversal(t) => check_literal(&t.expr, field),
        E::FuncCall(f) => f.args.iter().try_for_each(|e| check_literal(e, field)),
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
