from django.shortcuts import render

from .consumers import MAX_NAME


def course_chat_room(request, course_id: int):
    """The chat room page of a course; ``?name=`` says who is chatting."""
    name = request.GET.get("name", "").strip()[:MAX_NAME] or "anonymous"
    return render(request, "chat/room.html", {"course_id": course_id, "name": name})
