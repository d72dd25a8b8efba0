use super::*;

fn args(words: &[&str]) -> Vec<Vec<u8>> {
    words.iter().map(|w| w.as_bytes().to_vec()).collect()
}

fn parse_all(input: &[u8]) -> (Vec<Vec<Vec<u8>>>, Result<(), ProtocolError>, usize) {
    let mut buffer = BytesMut::from(input);
    let mut commands = Vec::new();
    let mut parser = Parser::default();
    loop {
        match parser.next(&mut buffer, Bounds::default()) {
            Ok(Some(command)) => commands.push(command),
            Ok(None) => return (commands, Ok(()), buffer.len()),
            Err(e) => return (commands, Err(e), buffer.len()),
        }
    }
}

#[test]
fn the_seeds_nc_session_parses_as_inline_commands() {
    let (commands, result, left) = parse_all(b"SET a 10\nGET a\r\nDELETE a\n\n");
    assert_eq!(result, Ok(()));
    assert_eq!(left, 0);
    assert_eq!(
        commands,
        [
            args(&["SET", "a", "10"]),
            args(&["GET", "a"]),
            args(&["DELETE", "a"])
        ]
    );
}

#[test]
fn pipelined_multibulk_commands_parse_in_order_and_wait_for_their_bytes() {
    let one = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nv\r\nx\n\r\n";
    let two = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
    let mut all = one.to_vec();
    all.extend_from_slice(two);
    let (commands, result, _) = parse_all(&all);
    assert_eq!(result, Ok(()));
    assert_eq!(commands[0][2], b"v\r\nx\n".to_vec(), "binary-safe");
    assert_eq!(commands[1], args(&["GET", "k"]));
    // Fed a byte at a time, a command is "need more" until its last byte.
    let mut parser = Parser::default();
    let mut buffer = BytesMut::new();
    for (i, &byte) in two.iter().enumerate() {
        buffer.extend_from_slice(&[byte]);
        let parsed = parser
            .next(&mut buffer, Bounds::default())
            .expect("no error");
        assert_eq!(parsed.is_some(), i == two.len() - 1, "byte {i}");
    }
    assert!(parser.is_idle(&buffer));
}

#[test]
fn hostile_lengths_and_framing_are_protocol_errors() {
    let bounds = Bounds {
        max_bulk: 100,
        max_args: 10,
        max_inline: 64,
        max_command: 150,
    };
    let mut over_command = b"*2\r\n$100\r\n".to_vec();
    over_command.extend_from_slice(&[b'x'; 100]);
    over_command.extend_from_slice(b"\r\n$60\r\n");
    for (input, says) in [
        (&b"*11\r\n"[..], "invalid multibulk length"),
        (b"*x\r\n", "invalid multibulk length"),
        (b"*1\r\n$101\r\n", "invalid bulk length"),
        (b"*1\r\n$-5\r\n", "invalid bulk length"),
        (b"*1\r\n$99999999999999999999999\r\n", "invalid bulk length"),
        (b"*1\r\n:1\r\n", "expected '$'"),
        (b"*1\r\n$1\r\nab\r\n", "not followed by CRLF"),
        (b"SET \"a b\nGET x\n", "unbalanced quotes"),
        (&over_command, "larger than this node takes"),
    ] {
        let mut buffer = BytesMut::from(input);
        let refused = Parser::default()
            .next(&mut buffer, bounds)
            .expect_err(&String::from_utf8_lossy(input));
        assert!(refused.0.contains(says), "{:?}: {}", input, refused.0);
    }
    // A line that never ends is refused once it is longer than any may be;
    // a header, once it is longer than a header may be.
    let mut buffer = BytesMut::from(&[b'a'; 65][..]);
    let refused = Parser::default().next(&mut buffer, bounds).unwrap_err();
    assert!(refused.0.contains("too big inline"));
    let mut buffer = BytesMut::from(&b"*1\r\n$1"[..]);
    buffer.extend_from_slice(&[b'0'; 70]);
    assert!(Parser::default().next(&mut buffer, bounds).is_err());
}

#[test]
fn inline_quoting_follows_redis() {
    assert_eq!(
        split_inline(br#"SET "a key" 'it''s' "\x41\n""#),
        None,
        "a quote right after a closing quote"
    );
    assert_eq!(
        split_inline(br#"SET "a key" 'it\'s' "\x41\n""#).unwrap(),
        [
            b"SET".to_vec(),
            b"a key".to_vec(),
            b"it's".to_vec(),
            b"A\n".to_vec()
        ]
    );
    assert_eq!(split_inline(b"  \t ").unwrap(), Vec::<Vec<u8>>::new());
    assert_eq!(split_inline(b"'open").unwrap_or_default().len(), 0);
}

#[test]
fn replies_encode_in_both_versions() {
    let mut two = Vec::new();
    let mut three = Vec::new();
    let reply = Reply::Array(vec![
        Reply::ok(),
        Reply::error("ERR bad\r\nthing"),
        Reply::Integer(-3),
        Reply::bulk("v"),
        Reply::Null,
        Reply::Map(vec![(Reply::bulk("k"), Reply::Integer(1))]),
    ]);
    reply.encode(2, &mut two);
    reply.encode(3, &mut three);
    assert_eq!(
        two,
        b"*6\r\n+OK\r\n-ERR bad  thing\r\n:-3\r\n$1\r\nv\r\n$-1\r\n*2\r\n$1\r\nk\r\n:1\r\n"
            .to_vec()
    );
    assert_eq!(
        three,
        b"*6\r\n+OK\r\n-ERR bad  thing\r\n:-3\r\n$1\r\nv\r\n_\r\n%1\r\n$1\r\nk\r\n:1\r\n".to_vec()
    );
}
