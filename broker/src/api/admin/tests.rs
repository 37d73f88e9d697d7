use super::*;

#[test]
fn grpc_timeouts_parse_in_every_unit_and_bad_ones_are_ignored() {
    assert_eq!(parse_grpc_timeout("4S"), Some(Duration::from_secs(4)));
    assert_eq!(parse_grpc_timeout("3999m"), Some(Duration::from_millis(3999)));
    assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
    assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
    assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
    assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
    for bad in ["", "S", "4", "4s", "123456789S", "-1S", "4€"] {
        assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
    }
}

#[test]
fn a_membership_call_waits_for_the_shorter_of_its_default_and_the_callers_deadline() {
    let mut request = Request::new(());
    assert_eq!(membership_wait(&request), MEMBERSHIP_CALL_WAIT);
    request.set_timeout(Duration::from_secs(5));
    assert_eq!(membership_wait(&request), Duration::from_secs(4));
    request.set_timeout(Duration::from_secs(3600));
    assert_eq!(membership_wait(&request), MEMBERSHIP_CALL_WAIT);
}
