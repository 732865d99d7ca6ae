//! Finds the variables under a `browse` root: resolves the browse path
//! from the Root folder name by name, then walks the hierarchical
//! references below it (Organizes, HasComponent, ... but not
//! HasProperty: a variable's properties, such as its EURange, are not
//! values of the plant), bounded in depth and count.

use std::collections::{HashSet, VecDeque};

use opcua::client::Session;
use opcua::types::{
    BrowseDescription, BrowseDirection, BrowseResultMask, NodeClass, NodeId, ObjectId,
    ReferenceDescription, ReferenceTypeId, StatusCode,
};

use super::config::{BrowseRoot, Start};

/// Deepest folder nesting walked below a root (plant models are a few
/// levels deep; a cycle through Organizes is stopped by the visited set).
const MAX_DEPTH: usize = 16;
/// Most nodes visited under one root, so a root put at `Objects` of a
/// large server fails with a message instead of browsing for minutes.
const MAX_VISITED: usize = 50_000;
/// Most variables one source monitors from its browse roots.
pub const MAX_VARIABLES: usize = 10_000;
/// References asked per node and Browse request; the rest come through
/// BrowseNext.
const REFS_PER_REQUEST: u32 = 1000;

/// One variable found: its node id and its tag (`ROOT/child/.../name`).
pub struct Found {
    pub node: NodeId,
    pub tag: String,
}

/// Every forward hierarchical reference of `node`, all pages.
async fn children(session: &Session, node: &NodeId) -> Result<Vec<ReferenceDescription>, String> {
    let desc = BrowseDescription {
        node_id: node.clone(),
        browse_direction: BrowseDirection::Forward,
        reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
        include_subtypes: true,
        node_class_mask: NodeClass::Object as u32 | NodeClass::Variable as u32,
        result_mask: BrowseResultMask::All as u32,
    };
    let mut results = session
        .browse(&[desc], REFS_PER_REQUEST, None)
        .await
        .map_err(|e| format!("browsing {node}: {e}"))?;
    let mut refs = Vec::new();
    // Pages bounded too: MAX_VISITED references at most per node.
    for _ in 0..=(MAX_VISITED / REFS_PER_REQUEST as usize) {
        let Some(r) = results.pop() else { break };
        if r.status_code.is_bad() {
            return Err(format!("browsing {node}: {}", r.status_code));
        }
        refs.extend(r.references.unwrap_or_default());
        if r.continuation_point.is_null() || r.continuation_point.is_empty() {
            return Ok(refs);
        }
        results = session
            .browse_next(false, &[r.continuation_point])
            .await
            .map_err(|e| format!("browsing {node}: {e}"))?;
    }
    Ok(refs)
}

/// The node a root names.
async fn resolve(session: &Session, root: &BrowseRoot) -> Result<NodeId, String> {
    let segments = match root.start()? {
        Start::Node(id) => return Ok(id),
        Start::Path(s) => s,
    };
    let mut node: NodeId = ObjectId::RootFolder.into();
    let mut walked = String::new();
    for (ns, name) in segments {
        let matches: Vec<NodeId> = children(session, &node)
            .await?
            .into_iter()
            .filter(|r| {
                r.browse_name.name.as_ref() == name
                    && ns.is_none_or(|ns| r.browse_name.namespace_index == ns)
                    && r.node_id.server_index == 0
            })
            .map(|r| r.node_id.node_id)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let under = if walked.is_empty() {
            "the Root folder".to_string()
        } else {
            format!("`{walked}`")
        };
        match matches.as_slice() {
            [one] => node = one.clone(),
            [] => return Err(format!("`{}`: there is no `{name}` under {under}", root.path())),
            more => {
                return Err(format!(
                    "`{}`: {} nodes are named `{name}` under {under}; write N:{name} with the namespace index N",
                    root.path(),
                    more.len()
                ))
            }
        }
        if !walked.is_empty() {
            walked.push('/');
        }
        walked.push_str(&name);
    }
    Ok(node)
}

/// The variables under `root`, the root itself included when it is one.
/// `taken` holds node ids already monitored (listed in `nodes`, or under
/// an earlier root); they are skipped.
pub async fn variables(
    session: &Session,
    root: &BrowseRoot,
    taken: &mut HashSet<NodeId>,
    room: usize,
) -> Result<Vec<Found>, String> {
    let start = resolve(session, root).await?;
    let mut found = Vec::new();
    let mut visited = HashSet::from([start.clone()]);
    let mut queue = VecDeque::from([(start, root.tag().to_string(), 0usize)]);
    // The root itself, when it is a variable, is reported by its parent;
    // a root given as a variable's node id is simply monitored.
    if let Start::Node(id) = root.start()? {
        if is_variable(session, &id).await? && taken.insert(id.clone()) {
            found.push(Found {
                node: id,
                tag: root.tag().to_string(),
            });
        }
    }
    while let Some((node, tag, depth)) = queue.pop_front() {
        if depth >= MAX_DEPTH {
            continue;
        }
        for r in children(session, &node).await? {
            let has_property: NodeId = ReferenceTypeId::HasProperty.into();
            if r.reference_type_id == has_property || r.node_id.server_index != 0 {
                continue;
            }
            let id = r.node_id.node_id;
            if !visited.insert(id.clone()) {
                continue;
            }
            if visited.len() > MAX_VISITED {
                return Err(format!(
                    "`{}`: more than {MAX_VISITED} nodes below it; browse a narrower folder",
                    root.path()
                ));
            }
            let child_tag = format!("{tag}/{}", r.browse_name.name.as_ref());
            if r.node_class == NodeClass::Variable && taken.insert(id.clone()) {
                if found.len() >= room {
                    return Err(format!(
                        "`{}`: more than {MAX_VARIABLES} variables in all; browse narrower folders",
                        root.path()
                    ));
                }
                found.push(Found {
                    node: id.clone(),
                    tag: child_tag.clone(),
                });
            }
            queue.push_back((id, child_tag, depth + 1));
        }
    }
    Ok(found)
}

async fn is_variable(session: &Session, id: &NodeId) -> Result<bool, String> {
    use opcua::types::{AttributeId, ReadValueId, TimestampsToReturn, Variant};
    let read = ReadValueId {
        node_id: id.clone(),
        attribute_id: AttributeId::NodeClass as u32,
        ..Default::default()
    };
    let dv = session
        .read(&[read], TimestampsToReturn::Neither, 0.0)
        .await
        .map_err(|e| format!("reading the node class of {id}: {e}"))?;
    let dv = dv.into_iter().next().unwrap_or_default();
    if dv.status.is_some_and(|s| s.is_bad()) {
        let code = dv.status.unwrap_or(StatusCode::BadUnexpectedError);
        return Err(format!("{id}: {code}"));
    }
    Ok(matches!(dv.value, Some(Variant::Int32(c)) if c == NodeClass::Variable as i32))
}
