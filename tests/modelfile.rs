//! The Modelfile that `--ollama` writes follows Ollama's documented syntax
//! (docs/modelfile.md in ollama/ollama): `INSTRUCTION arguments` lines,
//! `#` comments, `"""` multi-line arguments, FROM first, PARAMETER names
//! from the documented list, and a TEMPLATE in Go's template language over
//! `.Messages` that renders the conversation exactly as llama.cpp's chat
//! template does.

use crate::common::*;
use gguf_abliterate::ffi::{self, GgmlType};
use std::path::Path;

/// Instructions Ollama documents (case-insensitive).
const INSTRUCTIONS: &[&str] = &[
    "FROM",
    "PARAMETER",
    "TEMPLATE",
    "SYSTEM",
    "ADAPTER",
    "LICENSE",
    "MESSAGE",
];

/// Documented PARAMETER names and whether their value is a number.
const PARAMETERS: &[(&str, bool)] = &[
    ("mirostat", true),
    ("mirostat_eta", true),
    ("mirostat_tau", true),
    ("num_ctx", true),
    ("repeat_last_n", true),
    ("repeat_penalty", true),
    ("temperature", true),
    ("seed", true),
    ("stop", false),
    ("num_predict", true),
    ("top_k", true),
    ("top_p", true),
    ("min_p", true),
];

/// Parses a Modelfile into (INSTRUCTION, argument) pairs, rejecting what
/// Ollama's parser rejects.
fn parse_modelfile(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (line, after) = rest.split_once('\n').unwrap_or((rest, ""));
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            rest = after;
            continue;
        }
        let (word, _) = trimmed
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("instruction without argument: {line:?}"))?;
        let name = word.to_uppercase();
        if !INSTRUCTIONS.contains(&name.as_str()) {
            return Err(format!("unknown instruction {word:?}"));
        }
        // The argument starts after the word, in `rest` (it may span lines).
        let arg_and_more = rest.trim_start()[word.len()..].trim_start_matches([' ', '\t']);
        let (value, next) = if let Some(body) = arg_and_more.strip_prefix("\"\"\"") {
            let end = body.find("\"\"\"").ok_or("unterminated \"\"\" argument")?;
            let (line_rest, next) = body[end + 3..]
                .split_once('\n')
                .unwrap_or((&body[end + 3..], ""));
            if !line_rest.trim().is_empty() {
                return Err(format!("text after closing \"\"\": {line_rest:?}"));
            }
            (body[..end].to_string(), next)
        } else {
            let arg = arg_and_more
                .split_once('\n')
                .map_or(arg_and_more, |(a, _)| a)
                .trim();
            let value = match arg.strip_prefix('"') {
                Some(quoted) if name != "PARAMETER" => quoted
                    .strip_suffix('"')
                    .ok_or_else(|| format!("unterminated string: {line:?}"))?
                    .replace("\\\"", "\""),
                _ => arg.to_string(),
            };
            (value, after)
        };
        out.push((name, value));
        rest = next;
    }
    Ok(out)
}

/// Checks PARAMETER arguments: a documented name, and a value of its type.
fn check_parameter(arg: &str) -> Result<(String, String), String> {
    let (name, value) = arg
        .split_once(char::is_whitespace)
        .ok_or_else(|| format!("PARAMETER without value: {arg:?}"))?;
    let &(_, numeric) = PARAMETERS
        .iter()
        .find(|(p, _)| *p == name)
        .ok_or_else(|| format!("undocumented parameter {name:?}"))?;
    let value = value.trim();
    let value = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => inner.to_string(),
        None if numeric => value.to_string(),
        None => return Err(format!("{name} takes a quoted string: {value:?}")),
    };
    if numeric && value.parse::<f64>().is_err() {
        return Err(format!("{name} takes a number: {value:?}"));
    }
    Ok((name.to_string(), value))
}

/// A node of the Go template subset that chat templates over `.Messages` use.
#[derive(Debug)]
enum Node {
    Text(String),
    Field(String),
    Range(String, Vec<Node>),
    IfEq(String, String, Vec<Node>, Vec<Node>),
    If(String, Vec<Node>, Vec<Node>),
}

/// Splits a Go template into text and actions, applying `{{-`/`-}}` trimming.
fn lex(template: &str) -> Result<Vec<Result<String, String>>, String> {
    let mut items: Vec<Result<String, String>> = Vec::new();
    let mut rest = template;
    let mut trim_next = false;
    while let Some(open) = rest.find("{{") {
        let mut text = &rest[..open];
        if trim_next {
            text = text.trim_start();
        }
        let close = rest[open..].find("}}").ok_or("unclosed {{")? + open;
        let mut action = &rest[open + 2..close];
        if let Some(a) = action.strip_prefix('-') {
            text = text.trim_end();
            action = a;
        }
        trim_next = action.ends_with('-');
        let action = action.strip_suffix('-').unwrap_or(action).trim();
        items.push(Ok(text.to_string()));
        items.push(Err(action.to_string()));
        rest = &rest[close + 2..];
    }
    items.push(Ok(if trim_next {
        rest.trim_start().to_string()
    } else {
        rest.to_string()
    }));
    Ok(items)
}

/// Parses actions until `end` (or `else`), returning the nodes and the terminator.
fn parse_nodes(
    items: &mut std::vec::IntoIter<Result<String, String>>,
) -> Result<(Vec<Node>, Option<String>), String> {
    let mut nodes = Vec::new();
    while let Some(item) = items.next() {
        let action = match item {
            Ok(text) => {
                nodes.push(Node::Text(text));
                continue;
            }
            Err(action) => action,
        };
        let words: Vec<&str> = action.split_whitespace().collect();
        match words.as_slice() {
            ["end"] | ["else"] => return Ok((nodes, Some(action))),
            [field] if field.starts_with('.') => nodes.push(Node::Field(field[1..].into())),
            ["range", list] if list.starts_with('.') => {
                let (body, end) = parse_nodes(items)?;
                if end.as_deref() != Some("end") {
                    return Err("range without end".into());
                }
                nodes.push(Node::Range(list[1..].into(), body));
            }
            ["if", rest @ ..] => {
                let (then, end) = parse_nodes(items)?;
                let otherwise = match end.as_deref() {
                    Some("else") => match parse_nodes(items)? {
                        (nodes, Some(e)) if e == "end" => nodes,
                        _ => return Err("if/else without end".into()),
                    },
                    Some("end") => Vec::new(),
                    _ => return Err("if without end".into()),
                };
                match rest {
                    ["eq", field, literal]
                        if field.starts_with('.') && literal.starts_with('"') =>
                    {
                        nodes.push(Node::IfEq(
                            field[1..].into(),
                            literal.trim_matches('"').into(),
                            then,
                            otherwise,
                        ))
                    }
                    [field] if field.starts_with('.') => {
                        nodes.push(Node::If(field[1..].into(), then, otherwise))
                    }
                    _ => return Err(format!("unsupported condition {action:?}")),
                }
            }
            _ => return Err(format!("unsupported action {{{{ {action} }}}}")),
        }
    }
    Ok((nodes, None))
}

fn parse_template(template: &str) -> Result<Vec<Node>, String> {
    let mut items = lex(template)?.into_iter();
    match parse_nodes(&mut items)? {
        (nodes, None) => Ok(nodes),
        (_, Some(t)) => Err(format!("unexpected {{{{ {t} }}}}")),
    }
}

/// Renders with Ollama's data: `.Messages` (each `.Role`, `.Content`) and
/// `.System`, `.Prompt` (empty when the template iterates `.Messages`).
fn render(
    nodes: &[Node],
    messages: &[(&str, &str)],
    current: Option<(&str, &str)>,
) -> Result<String, String> {
    let field = |name: &str| -> Result<String, String> {
        match (name, current) {
            ("Role", Some((role, _))) => Ok(role.into()),
            ("Content", Some((_, content))) => Ok(content.into()),
            ("System" | "Prompt" | "Response", None) => Ok(String::new()),
            _ => Err(format!("field .{name} is not defined here")),
        }
    };
    let mut out = String::new();
    for node in nodes {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Field(f) => out.push_str(&field(f)?),
            Node::Range(list, body) => {
                if list != "Messages" || current.is_some() {
                    return Err(format!("range over .{list}"));
                }
                for &m in messages {
                    out.push_str(&render(body, messages, Some(m))?);
                }
            }
            Node::IfEq(f, literal, then, otherwise) => {
                let branch = if field(f)? == *literal {
                    then
                } else {
                    otherwise
                };
                out.push_str(&render(branch, messages, current)?);
            }
            Node::If(f, then, otherwise) => {
                let branch = if field(f)?.is_empty() {
                    otherwise
                } else {
                    then
                };
                out.push_str(&render(branch, messages, current)?);
            }
        }
    }
    Ok(out)
}

#[test]
fn the_parser_rejects_what_ollama_rejects() {
    assert!(parse_modelfile("FROM ./m.gguf\nPARAMETER stop \"<x>\"\n").is_ok());
    assert!(parse_modelfile("FROM ./m.gguf\nBOGUS 1\n").is_err());
    assert!(parse_modelfile("FROM ./m.gguf\nTEMPLATE \"\"\"{{ .Prompt }}\n").is_err());
    assert!(check_parameter("temperature warm").is_err());
    assert!(check_parameter("tfs_z 1").is_err());
    assert!(check_parameter("stop <|im_end|>").is_err());
    assert!(parse_template("{{ range .Messages }}{{ .Content }}").is_err());
    assert!(parse_template("{{ .Content | upper }}").is_err());
    let t =
        parse_template("{{- range .Messages }}[{{ .Role }}] {{ .Content }}\n{{- end }}").unwrap();
    assert_eq!(
        render(&t, &[("user", "hi"), ("assistant", "yo")], None).unwrap(),
        "[user] hi[assistant] yo"
    );
}

/// Runs the main command with `--ollama` on a synthetic model whose
/// `tokenizer.chat_template` is `template`, and returns the Modelfile's text.
fn modelfile_for(dir: &Path, template: Option<&str>) -> String {
    let r = unit(&noise(256, 3));
    let mut model = SynthModel::new("llama", 256, GgmlType::F32, &r);
    if let Some(t) = template {
        model.extra_kv.push(Kv::str("tokenizer.chat_template", t));
    }
    let (input, direction, out) = (
        dir.join("in.gguf"),
        dir.join("dir.json"),
        dir.join("abliterated.gguf"),
    );
    model.write(&input);
    write_direction(&direction, &r);
    let run = bin()
        .arg(&input)
        .arg(&out)
        .arg("--direction")
        .arg(&direction)
        .args(["--no-verify", "--ollama", "--force", "--quiet"])
        .output()
        .unwrap();
    assert_success(&run);
    std::fs::read_to_string(dir.join("Modelfile")).unwrap()
}

#[test]
fn ollama_modelfiles_follow_the_documented_syntax_and_render_like_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    // (the model's template, the llama.cpp built-in it is, its end-of-turn token)
    let cases = [
        (
            "{% for m in messages %}<|im_start|>{{ m.role }}\n…",
            "chatml",
            "<|im_end|>",
        ),
        (
            "{{ bos_token }}{% for m in messages %}<start_of_turn>…",
            "gemma",
            "<end_of_turn>",
        ),
        (
            "{% for m in messages %}<|start_header_id|>…<|eot_id|>",
            "llama3",
            "<|eot_id|>",
        ),
    ];
    let conversation = [
        ("user", "What is the capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Italy?"),
    ];
    for (source, builtin, end_of_turn) in cases {
        let text = modelfile_for(dir.path(), Some(source));
        let parsed = parse_modelfile(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        // FROM comes first, once, and names the output beside the Modelfile.
        assert_eq!(parsed[0].0, "FROM", "{text}");
        assert_eq!(parsed.iter().filter(|(i, _)| i == "FROM").count(), 1);
        assert!(dir.path().join(&parsed[0].1).is_file(), "{text}");

        let parameters: Vec<(String, String)> = parsed
            .iter()
            .filter(|(i, _)| i == "PARAMETER")
            .map(|(_, a)| check_parameter(a).unwrap_or_else(|e| panic!("{e}\n{text}")))
            .collect();
        let stops: Vec<&str> = parameters
            .iter()
            .filter(|(n, _)| n == "stop")
            .map(|(_, v)| v.as_str())
            .collect();
        assert!(stops.contains(&end_of_turn), "{builtin}: stops {stops:?}");

        // The TEMPLATE renders the conversation as llama.cpp's built-in does.
        let templates: Vec<&String> = parsed
            .iter()
            .filter(|(i, _)| i == "TEMPLATE")
            .map(|(_, a)| a)
            .collect();
        assert_eq!(templates.len(), 1, "{text}");
        let nodes = parse_template(templates[0]).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let ours = render(&nodes, &conversation, None).unwrap();
        let llama = ffi::apply_chat_template(builtin, &conversation, true).unwrap();
        assert_eq!(ours, llama, "{builtin}");
    }

    // Without a chat template: FROM and parameters only, still valid.
    let text = modelfile_for(dir.path(), None);
    let parsed = parse_modelfile(&text).unwrap();
    assert_eq!(parsed[0].0, "FROM");
    assert!(parsed.iter().all(|(i, _)| i != "TEMPLATE"));
}
