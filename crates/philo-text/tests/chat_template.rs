//! Chat template tests. Expected prompts are derived by hand from the template
//! sources in tests/fixtures and written out literally.

use std::path::Path;

use philo_text::{ChatMessage, ChatTemplate, TextError, Tokenizer, TokenizerConfig};

const PHI3_4K_CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../assets/phi-3-tokenizer/tokenizer_config.json"
);
const PHI3_4K_TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../assets/phi-3-tokenizer/tokenizer.json"
);
const PHI3_EARLY_CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/tokenizer/phi-3-early/tokenizer_config.json"
);
const PHI3_EARLY_TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/tokenizer/phi-3-early/tokenizer.json"
);
const PHI35_TEMPLATE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/templates/phi-3.5-mini-instruct.jinja"
);

/// system + user + assistant.
fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("You are a helpful assistant."),
        ChatMessage::user("What is 2+2?"),
        ChatMessage::assistant("2+2 is 4."),
    ]
}

/// What every Phi-3 template in the fixtures makes of `conversation()`, before
/// the ending (generation prompt or EOS).
const CONVERSATION_BODY: &str = "<|system|>\nYou are a helpful assistant.<|end|>\n\
                                 <|user|>\nWhat is 2+2?<|end|>\n\
                                 <|assistant|>\n2+2 is 4.<|end|>\n";

fn phi3_4k() -> ChatTemplate {
    ChatTemplate::from_tokenizer_config(Path::new(PHI3_4K_CONFIG)).expect("4k template")
}

fn phi35() -> ChatTemplate {
    ChatTemplate::from_jinja_file(Path::new(PHI35_TEMPLATE), "<s>", "<|endoftext|>")
        .expect("3.5 template")
}

#[test]
fn phi3_4k_template_renders_a_conversation() {
    let template = phi3_4k();
    assert_eq!(template.bos_token(), "<s>");
    assert_eq!(template.eos_token(), "<|endoftext|>");
    assert!(template
        .origin()
        .ends_with("tokenizer_config.json field chat_template"));

    assert_eq!(
        template.render(&conversation(), true).unwrap(),
        "<|system|>\nYou are a helpful assistant.<|end|>\n\
         <|user|>\nWhat is 2+2?<|end|>\n\
         <|assistant|>\n2+2 is 4.<|end|>\n\
         <|assistant|>\n"
    );
    assert_eq!(
        template.render(&conversation(), false).unwrap(),
        "<|system|>\nYou are a helpful assistant.<|end|>\n\
         <|user|>\nWhat is 2+2?<|end|>\n\
         <|assistant|>\n2+2 is 4.<|end|>\n\
         <|endoftext|>"
    );
    // The usual prompt: system + user, asking for the assistant's turn.
    assert_eq!(
        template.render(&conversation()[..2], true).unwrap(),
        "<|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"
    );
}

#[test]
fn phi3_4k_template_keeps_an_empty_system_message() {
    let messages = [ChatMessage::system(""), ChatMessage::user("Hi")];
    assert_eq!(
        phi3_4k().render(&messages, true).unwrap(),
        "<|system|>\n<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    );
}

#[test]
fn phi35_template_renders_a_conversation() {
    let template = phi35();
    assert!(template.origin().ends_with("phi-3.5-mini-instruct.jinja"));
    // Same source through `new` gives the same template.
    let source = std::fs::read_to_string(PHI35_TEMPLATE).unwrap();
    let same = ChatTemplate::new(&source, "<s>", "<|endoftext|>").unwrap();
    assert_eq!(same.source(), template.source());
    assert_eq!(
        same.render(&conversation(), true).unwrap(),
        template.render(&conversation(), true).unwrap()
    );
    assert_eq!(
        template.render(&conversation(), true).unwrap(),
        format!("{CONVERSATION_BODY}<|assistant|>\n")
    );
    assert_eq!(
        template.render(&conversation(), false).unwrap(),
        format!("{CONVERSATION_BODY}<|endoftext|>")
    );
    assert_eq!(
        template.render(&conversation(), true).unwrap(),
        "<|system|>\nYou are a helpful assistant.<|end|>\n\
         <|user|>\nWhat is 2+2?<|end|>\n\
         <|assistant|>\n2+2 is 4.<|end|>\n\
         <|assistant|>\n"
    );
}

#[test]
fn phi35_template_drops_an_empty_system_message() {
    // `message['role'] == 'system' and message['content']`: empty content is falsy.
    let messages = [ChatMessage::system(""), ChatMessage::user("Hi")];
    assert_eq!(
        phi35().render(&messages, true).unwrap(),
        "<|user|>\nHi<|end|>\n<|assistant|>\n"
    );
}

#[test]
fn early_phi3_template_adds_bos_and_ignores_system_and_generation_prompt() {
    let template = ChatTemplate::from_tokenizer_config(Path::new(PHI3_EARLY_CONFIG)).unwrap();
    let config = TokenizerConfig::from_file(Path::new(PHI3_EARLY_CONFIG)).unwrap();
    assert_eq!(config.add_bos_token, Some(true));

    let messages = [
        ChatMessage::user("Hi"),
        ChatMessage::assistant("Hello! How can I help?"),
        ChatMessage::user("Tell me a joke."),
    ];
    let expected = "<s><|user|>\nHi<|end|>\n<|assistant|>\n\
                    Hello! How can I help?<|end|>\n\
                    <|user|>\nTell me a joke.<|end|>\n<|assistant|>\n";
    // This template writes `<|assistant|>\n` after every user turn itself and
    // never looks at add_generation_prompt or eos_token.
    assert_eq!(template.render(&messages, true).unwrap(), expected);
    assert_eq!(template.render(&messages, false).unwrap(), expected);
    // System messages are silently dropped.
    let with_system: Vec<ChatMessage> = std::iter::once(ChatMessage::system("Be terse."))
        .chain(messages.iter().cloned())
        .collect();
    assert_eq!(template.render(&with_system, true).unwrap(), expected);
}

#[test]
fn builtin_default_matches_the_phi3_4k_template() {
    let builtin = ChatTemplate::phi3_default();
    let official = phi3_4k();
    let conversations = [
        conversation(),
        conversation()[..2].to_vec(),
        vec![ChatMessage::user("Hi")],
        vec![ChatMessage::system(""), ChatMessage::user("Hi")],
        vec![
            ChatMessage::user("a"),
            ChatMessage::assistant("b"),
            ChatMessage::user("c"),
        ],
        vec![],
    ];
    for messages in &conversations {
        for add_generation_prompt in [true, false] {
            assert_eq!(
                builtin.render(messages, add_generation_prompt).unwrap(),
                official.render(messages, add_generation_prompt).unwrap(),
                "{messages:?}, add_generation_prompt={add_generation_prompt}"
            );
        }
    }
}

#[test]
fn builtin_default_rejects_unknown_roles() {
    let err = ChatTemplate::phi3_default()
        .render(&[ChatMessage::new("tool", "42")], true)
        .unwrap_err();
    match &err {
        TextError::TemplateRaised { message, .. } => {
            assert!(message.contains("\"tool\""), "{message}");
        }
        other => panic!("expected TemplateRaised, got {other:?}"),
    }
}

#[test]
fn config_without_chat_template_falls_back_to_the_builtin() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer_config.json");
    std::fs::write(
        &path,
        r#"{"bos_token": "<s>", "eos_token": "<|endoftext|>"}"#,
    )
    .unwrap();
    let template = ChatTemplate::from_tokenizer_config(&path).unwrap();
    assert_eq!(template.source(), philo_text::PHI3_DEFAULT_TEMPLATE);
    assert_eq!(
        template.render(&conversation(), false).unwrap(),
        format!("{CONVERSATION_BODY}<|endoftext|>")
    );
}

#[test]
fn list_of_named_templates_picks_default() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer_config.json");
    // Tokens written as AddedToken objects, as some configs do.
    let json = r#"{
        "bos_token": {"content": "<s>", "lstrip": false, "rstrip": false},
        "eos_token": {"content": "<|endoftext|>", "lstrip": false, "rstrip": false},
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{{ eos_token }}"},
            {"name": "rag", "template": "RAG"}
        ]
    }"#;
    std::fs::write(&path, json).unwrap();

    let config = TokenizerConfig::from_file(&path).unwrap();
    assert_eq!(config.bos_token.as_deref(), Some("<s>"));
    assert_eq!(config.eos_token.as_deref(), Some("<|endoftext|>"));
    assert_eq!(config.add_bos_token, None);

    let template = ChatTemplate::from_tokenizer_config(&path).unwrap();
    assert_eq!(
        template.render(&conversation()[..2], true).unwrap(),
        "<s>[system] You are a helpful assistant.\n[user] What is 2+2?\n<|endoftext|>"
    );
}

#[test]
fn list_without_default_is_an_error_naming_the_field() {
    let json = r#"{"chat_template": [{"name": "tool_use", "template": "TOOLS"}]}"#;
    let err =
        TokenizerConfig::parse(json, Path::new("models/x/tokenizer_config.json")).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, TextError::ConfigField { .. }), "{err:?}");
    assert!(
        message.contains("models/x/tokenizer_config.json field chat_template"),
        "{message}"
    );
    assert!(message.contains("\"tool_use\""), "{message}");
    assert!(message.contains("\"default\""), "{message}");
}

#[test]
fn malformed_config_fields_are_errors_naming_the_field() {
    let path = Path::new("tokenizer_config.json");
    for (json, field) in [
        (r#"{"chat_template": 3}"#, "chat_template"),
        (
            r#"{"chat_template": [{"name": "default"}]}"#,
            "chat_template",
        ),
        (r#"{"bos_token": 1}"#, "bos_token"),
        (r#"{"eos_token": {"lstrip": false}}"#, "eos_token"),
        (r#"{"add_bos_token": "yes"}"#, "add_bos_token"),
    ] {
        let err = TokenizerConfig::parse(json, path).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("tokenizer_config.json field {field}: ")),
            "{json}: {err}"
        );
    }
    let err = TokenizerConfig::parse("{not json", path).unwrap_err();
    assert!(matches!(err, TextError::ConfigParse { .. }), "{err:?}");
    let err = TokenizerConfig::parse("[]", path).unwrap_err();
    assert!(matches!(err, TextError::ConfigParse { .. }), "{err:?}");
    // null tokens mean "none".
    let config =
        TokenizerConfig::parse(r#"{"eos_token": null, "chat_template": null}"#, path).unwrap();
    assert_eq!(config.eos_token, None);
    assert_eq!(config.chat_template, None);
}

#[test]
fn template_that_does_not_compile_names_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer_config.json");
    std::fs::write(
        &path,
        r#"{"chat_template": "{% for m in messages %}{{ m.content }}"}"#,
    )
    .unwrap();
    let err = ChatTemplate::from_tokenizer_config(&path).unwrap_err();
    assert!(matches!(err, TextError::TemplateCompile { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("{} field chat_template", path.display())),
        "{message}"
    );

    let err = ChatTemplate::new("{{ unclosed", "<s>", "</s>").unwrap_err();
    assert!(err.to_string().contains("ChatTemplate::new"), "{err}");

    let jinja = dir.path().join("chat_template.jinja");
    std::fs::write(&jinja, "{% if %}").unwrap();
    let err = ChatTemplate::from_jinja_file(&jinja, "<s>", "</s>").unwrap_err();
    assert!(
        err.to_string().contains(&jinja.display().to_string()),
        "{err}"
    );
    let missing = dir.path().join("missing.jinja");
    let err = ChatTemplate::from_jinja_file(&missing, "<s>", "</s>").unwrap_err();
    assert!(matches!(err, TextError::Read { .. }), "{err:?}");
}

#[test]
fn raise_exception_becomes_a_text_error() {
    // The shape HF templates use to enforce alternating roles.
    let source = "{% for message in messages %}\
                  {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
                  {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\
                  {% endif %}{{ message['content'] }}{% endfor %}";
    let template = ChatTemplate::new(source, "<s>", "</s>").unwrap();
    assert_eq!(
        template
            .render(
                &[ChatMessage::user("a"), ChatMessage::assistant("b")],
                false
            )
            .unwrap(),
        "ab"
    );
    let err = template
        .render(&[ChatMessage::user("a"), ChatMessage::user("b")], false)
        .unwrap_err();
    match &err {
        TextError::TemplateRaised { message, .. } => assert_eq!(
            message,
            "Conversation roles must alternate user/assistant/user/assistant/..."
        ),
        other => panic!("expected TemplateRaised, got {other:?}"),
    }
    assert!(
        err.to_string()
            .contains("Conversation roles must alternate"),
        "{err}"
    );
}

#[test]
fn python_compatible_jinja_works_like_transformers() {
    // transformers renders with trim_blocks and lstrip_blocks, so block tags on
    // their own lines leave no newlines or indentation behind. `.strip()` is a
    // Python string method; `loop.last`, `|trim` and loop controls are Jinja.
    let source = "\
{% for message in messages %}
    {% if message['role'] == 'skip' %}
        {% continue %}
    {% endif %}
{{ message['role'] | upper }}: {{ message['content'].strip() }}
    {% if not loop.last %}
---
    {% endif %}
{% endfor %}
{{ '  end  ' | trim }}{% if eos_token.startswith('<|') %}!{% endif %}";
    let template = ChatTemplate::new(source, "<s>", "<|endoftext|>").unwrap();
    let messages = [
        ChatMessage::user("  hi  "),
        ChatMessage::new("skip", "x"),
        ChatMessage::assistant("hello\n"),
    ];
    assert_eq!(
        template.render(&messages, false).unwrap(),
        "USER: hi\n---\nASSISTANT: hello\nend!"
    );
}

#[test]
fn rendered_phi3_prompt_tokenizes_special_tokens_as_single_ids() {
    let tokenizer = Tokenizer::from_file(Path::new(PHI3_4K_TOKENIZER)).unwrap();
    for (token, id) in [
        ("<|user|>", 32010),
        ("<|end|>", 32007),
        ("<|assistant|>", 32001),
        ("<|system|>", 32006),
    ] {
        assert_eq!(tokenizer.encode(token, false).unwrap(), [id], "{token}");
    }

    let prompt = phi3_4k().render(&conversation()[..2], true).unwrap();
    let ids = tokenizer.encode(&prompt, false).unwrap();
    // In the 4k tokenizer.json these special tokens have `rstrip: true`, so
    // each one swallows the "\n" the template puts after it: no newline ids
    // appear, and the text after a special token starts a fresh "▁"-prefixed
    // segment ("▁You", "▁What"). transformers tokenizes the same way.
    assert_eq!(
        ids,
        [
            32006, // <|system|>
            887, 526, 263, 8444, 20255, 29889, // ▁You ▁are ▁a ▁helpful ▁assistant .
            32007, // <|end|>
            32010, // <|user|>
            1724, 338, 29871, 29906, 29974, 29906, 29973, // ▁What ▁is ▁ 2 + 2 ?
            32007, // <|end|>
            32001, // <|assistant|>
        ]
    );
    // So decoding does not give the prompt back.
    assert_eq!(
        tokenizer.decode(&ids, false).unwrap(),
        "<|system|> You are a helpful assistant.<|end|><|user|> What is 2+2?<|end|><|assistant|>"
    );
}

#[test]
fn early_phi3_tokenizer_keeps_newlines_after_special_tokens() {
    // The early tokenizer.json has `rstrip: false`, so "\n" after a special
    // token is its own segment: "▁" (29871) then the byte token <0x0A> (13).
    let tokenizer = Tokenizer::from_file(Path::new(PHI3_EARLY_TOKENIZER)).unwrap();
    let template = ChatTemplate::from_tokenizer_config(Path::new(PHI3_EARLY_CONFIG)).unwrap();
    let prompt = template
        .render(&[ChatMessage::user("What is 2+2?")], true)
        .unwrap();
    assert_eq!(prompt, "<s><|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n");
    assert_eq!(
        tokenizer.encode(&prompt, false).unwrap(),
        [
            1,     // <s>, written by the template
            32010, // <|user|>
            29871, 13, // ▁ \n
            5618, 338, 29871, 29906, 29974, 29906, 29973, // What ▁is ▁ 2 + 2 ?
            32007, // <|end|>
            29871, 13,    // ▁ \n
            32001, // <|assistant|>
            29871, 13, // ▁ \n
        ]
    );
}
